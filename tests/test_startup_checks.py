"""The three first mistakes ``vllm_laguna.startup_checks`` answers, each through the path a user
takes: ``EngineArgs.create_engine_config()`` (what ``vllm serve`` and ``LLM()`` run before
any engine process starts) and, for the KV-cache size, the ``vllm serve`` command itself."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time

import pytest

from vllm_laguna import startup_checks
from vllm_laguna.local_server import vllm_command
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.llama4 import build_llama4

TEXT_TOWER = {"architectures": ["Llama4ForCausalLM"]}


@pytest.fixture(scope="module")
def laguna(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna") / "ckpt")


@pytest.fixture(scope="module")
def multimodal_llama4(tmp_path_factory):
    path = build_llama4(tmp_path_factory.mktemp("llama4") / "ckpt", layout="multimodal")
    assert json.loads((path / "config.json").read_text())["architectures"] == [startup_checks.MULTIMODAL_LLAMA4]
    return path


@pytest.fixture
def warnings():
    """The messages startup_checks logs (its logger is a child of vLLM's, which does not propagate)."""
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    startup_checks.logger.addHandler(handler)
    yield records
    startup_checks.logger.removeHandler(handler)


def engine_config(model, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(model), max_model_len=512, enforce_eager=True, **kwargs).create_engine_config()


# -- (a) no KV-cache size on the CPU backend -------------------------------------------------

cpu_only = pytest.mark.skipif(
    not __import__("vllm.platforms", fromlist=["current_platform"]).current_platform.is_cpu(),
    reason="the KV-cache size check is for vLLM's CPU backend",
)


@cpu_only
def test_unset_kv_space_that_vllm_would_refuse_says_what_to_set(laguna, monkeypatch):
    """All of the node's memory (utilization 1.0) is never free, so vLLM's worker would
    refuse; we refuse first and name the variable and the flag."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    with pytest.raises(Exception, match=r"VLLM_CPU_KVCACHE_SPACE=\d+ vllm serve") as error:
        engine_config(laguna, gpu_memory_utilization=1.0)
    assert "--kv-cache-memory-bytes" in str(error.value)


@cpu_only
@pytest.mark.parametrize("how", ["env", "flag"])
def test_a_kv_cache_size_passes(laguna, monkeypatch, warnings, how):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    if how == "env":
        monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        config = engine_config(laguna, gpu_memory_utilization=1.0)
    else:
        config = engine_config(laguna, gpu_memory_utilization=1.0, kv_cache_memory_bytes=1 << 30)
    assert config.cache_config.kv_cache_memory_bytes == 1 << 30
    assert not warnings


@cpu_only
def test_unset_kv_space_that_fits_warns_how_much_it_takes(laguna, monkeypatch, warnings):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    engine_config(laguna, gpu_memory_utilization=0.01)
    (message,) = warnings
    assert "VLLM_CPU_KVCACHE_SPACE is not set" in message and "(0.01)" in message


def test_kv_space_decision(monkeypatch):
    """The rule on its own: refuse exactly when vLLM's worker would (requested > free)."""
    from vllm.config import CacheConfig

    gib = 1 << 30
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr("vllm.platforms.current_platform.is_cpu", lambda: True)
    monkeypatch.setattr(startup_checks, "cpu_worker_memory", lambda: (0, 8 * gib, 4 * gib))
    with pytest.raises(ValueError, match=r"7\.36 of 8\.00 GiB.*only 4\.00 GiB is free.*VLLM_CPU_KVCACHE_SPACE=1 "):
        startup_checks.check_cpu_kv_cache(CacheConfig(gpu_memory_utilization=0.92))
    startup_checks.check_cpu_kv_cache(CacheConfig(gpu_memory_utilization=0.5))  # 4 GiB of 4: fits
    monkeypatch.setattr("vllm.platforms.current_platform.is_cpu", lambda: False)
    startup_checks.check_cpu_kv_cache(CacheConfig(gpu_memory_utilization=0.92))  # CUDA: not ours to judge


@cpu_only
@pytest.mark.slow
def test_vllm_serve_without_kv_space_stops_at_once_with_the_fix(laguna):
    """The user's command: it exits before any engine process starts, the fix last on screen."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    started = time.monotonic()
    out = subprocess.run(
        [vllm_command(), "serve", str(laguna), "--gpu-memory-utilization", "1.0", "--enforce-eager"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode != 0
    output = out.stdout + out.stderr
    assert "EngineCore" not in output, "the engine started before the check"
    tail = output.strip().splitlines()[-4:]
    assert any("VLLM_CPU_KVCACHE_SPACE=" in line and "vllm-laguna:" in line for line in tail), tail
    assert time.monotonic() - started < 300


# -- (b) vLLM's in-tree poolside_v1 parser on a Laguna model ---------------------------------


def test_poolside_v1_on_laguna_warns_and_keeps_it(laguna, monkeypatch, warnings):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    config = engine_config(laguna, reasoning_parser="poolside_v1")
    assert config.structured_outputs_config.reasoning_parser == "poolside_v1"  # a warning, not a refusal
    (message,) = warnings
    assert "--reasoning-parser laguna --tool-call-parser laguna" in message


def test_laguna_parser_does_not_warn(laguna, monkeypatch, warnings):
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    engine_config(laguna, reasoning_parser="laguna")
    assert not warnings


# -- (c) a multimodal Llama 4 checkpoint -----------------------------------------------------


@pytest.mark.skipif(
    startup_checks.multimodal_llama4_importable(), reason="torchvision is installed: vLLM's multimodal class serves it"
)
def test_multimodal_llama4_without_torchvision_says_which_override(multimodal_llama4, monkeypatch):
    """Without our check vLLM fails to import its multimodal class (torchvision) and says
    only 'failed to be inspected'."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    with pytest.raises(Exception, match=r"--hf-overrides '\{\"architectures\": \[\"Llama4ForCausalLM\"\]\}'"):
        engine_config(multimodal_llama4)
    config = engine_config(multimodal_llama4, hf_overrides=TEXT_TOWER)  # the override it names works
    assert config.model_config.architecture == "Llama4ForCausalLM"


def test_multimodal_llama4_with_torchvision_warns_vllms_class_serves_it(monkeypatch, warnings):
    monkeypatch.setattr(startup_checks, "multimodal_llama4_importable", lambda: True)
    startup_checks.check_multimodal_llama4(startup_checks.MULTIMODAL_LLAMA4)
    (message,) = warnings
    assert "in-tree multimodal Llama 4" in message and startup_checks.TEXT_TOWER_OVERRIDE in message


def test_checks_run_for_our_architectures_only():
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    import vllm_laguna

    vllm_laguna.register()
    ours = {a for a, cls in MODELS_CONFIG_MAP.items() if cls is startup_checks.StartupChecks}
    assert ours == {*vllm_laguna.MODELS, startup_checks.MULTIMODAL_LLAMA4}
