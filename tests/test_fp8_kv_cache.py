"""vLLM's fp8 KV cache (``kv_cache_dtype="fp8"``, e4m3, scale 1 without checkpoint scales)
under Laguna on the CPU backend: it needs AVX-512 or AMX (``cpu_attn._get_attn_isa``),
and is refused at load elsewhere, naming what to use instead."""

from __future__ import annotations

import pytest

from harness import FP8, low_precision_gaps, load_error, prompts_for, vllm_run
from vllm_laguna.cpu_kind import missing
from vllm_laguna.tiny.laguna import build_laguna

FP8_KV = "fp8 KV cache (kv_cache_dtype='fp8')"
PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=7)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna") / "ckpt")


def _kv_caches(model):
    """Every attention layer's KV-cache dtype setting and element size."""
    seen = set()
    for layer in model.model.layers:
        attn = layer.self_attn.attn
        cache = attn.kv_cache[0] if isinstance(attn.kv_cache, (list, tuple)) else attn.kv_cache
        seen.add((attn.kv_cache_dtype, cache.element_size(), cache.numel() > 0))
    return seen


def test_fp8_kv_cache_close_to_exact(checkpoint):
    """bf16 with every layer's keys and values stored as fp8 (sliding-window and full
    layers, prompts past the window), against exact arithmetic on vLLM's own tokens, within
    the fp8 bounds (``harness.FP8``)."""
    reason = missing(FP8_KV)
    if reason:
        pytest.skip(reason)
    results, caches = vllm_run(
        checkpoint,
        PROMPTS,
        max_new_tokens=24,
        dtype="bfloat16",
        kv_cache_dtype="fp8",
        inspect=_kv_caches,
        prompt_logprobs=True,
    )
    assert caches == {("fp8", 1, True)}, caches
    print(low_precision_gaps(checkpoint, PROMPTS, results).assert_within(FP8))


def test_fp8_kv_cache_refused_on_avx2(checkpoint):
    if missing(FP8_KV) is None:
        pytest.skip("this CPU has AVX-512 or AMX, so the fp8 KV cache runs: test_fp8_kv_cache_close_to_exact")
    message = load_error(checkpoint, kv_cache_dtype="fp8")
    assert "UnsupportedOnCpu" in message and "kv_cache_dtype='auto'" in message, message
