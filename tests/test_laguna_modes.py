"""Laguna under the settings users actually run: bf16, vLLM's default compiled mode, and
tensor parallelism 2 on the CPU backend (the last two in one engine)."""

from __future__ import annotations

import pytest

from harness import BF16, assert_parity, hf_greedy, low_precision_gaps, prompts_for, vllm_greedy, vllm_run
from vllm_laguna.tiny.laguna import build_laguna

PROMPTS = prompts_for(512, [5, 23, 40, 70], seed=7)
#: more, shorter runs for the bf16 statistics: 12 prompts (half past the sliding window),
#: 24 steps each
BF16_PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna") / "ckpt")


def test_bf16_close_to_exact(checkpoint):
    """bf16 (the checkpoint's fp32 weights cast at load) against exact arithmetic on vLLM's
    own tokens, within the bf16 bounds (``harness.BF16``), on the prefill and decode paths."""
    results, _ = vllm_run(checkpoint, BF16_PROMPTS, max_new_tokens=24, dtype="bfloat16", prompt_logprobs=True)
    print(low_precision_gaps(checkpoint, BF16_PROMPTS, results).assert_within(BF16))


def test_tensor_parallel_2_compiled(tmp_path, monkeypatch):
    """TP=2, one core per rank, in vLLM's default compiled mode (no enforce_eager): per-layer
    head counts split across ranks, and a single KV head (fewer KV heads than ranks, so it is
    replicated)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = build_laguna(tmp_path / "tp", num_kv_heads=1, heads_per_layer=[2, 4, 6, 8], seed=5)
    expected = hf_greedy(ckpt, PROMPTS)
    actual = vllm_greedy(
        ckpt, PROMPTS, tensor_parallel_size=2, distributed_executor_backend="mp", enforce_eager=False
    )
    assert_parity(expected, actual)
