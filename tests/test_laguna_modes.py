"""Laguna under the settings users actually run: bf16, vLLM's default compiled mode, and
tensor parallelism 2 on the CPU backend."""

from __future__ import annotations

import pytest
import torch

from harness import assert_close_greedy_bf16, assert_parity, hf_greedy, prompts_for, vllm_greedy
from vllm_laguna.tiny.laguna import build_laguna

PROMPTS = prompts_for(512, [5, 23, 40, 70], seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna") / "ckpt")


@pytest.fixture(scope="module")
def reference(checkpoint):
    return hf_greedy(checkpoint, PROMPTS)


def test_bf16_follows_vllm_convention(checkpoint):
    bf16_ckpt = checkpoint  # fp32 weights, both sides cast to bf16 at load
    expected = hf_greedy(bf16_ckpt, PROMPTS, dtype=torch.bfloat16)
    actual = vllm_greedy(bf16_ckpt, PROMPTS, dtype="bfloat16")
    assert_close_greedy_bf16(expected, actual)


def test_default_compiled_mode(checkpoint, reference):
    """torch.compile as vLLM does by default (no enforce_eager)."""
    assert_parity(reference, vllm_greedy(checkpoint, PROMPTS, enforce_eager=False))


def test_tensor_parallel_2(tmp_path, monkeypatch):
    """TP=2, one core per rank: per-layer head counts split across ranks, and a single KV
    head (fewer KV heads than ranks, so it is replicated)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = build_laguna(tmp_path / "tp", num_kv_heads=1, heads_per_layer=[2, 4, 6, 8], seed=5)
    expected = hf_greedy(ckpt, PROMPTS)
    actual = vllm_greedy(ckpt, PROMPTS, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert_parity(expected, actual)
