"""Prefix caching changes nothing but the work done: prompts sharing a prefix longer than the
sliding window (Laguna) or the attention chunk (Llama 4), and several 128-token KV blocks
(the CPU block size), decode the same greedy tokens and logprobs with prefix caching on as
off, and the second batch really reads the cached blocks (``RequestOutput.num_cached_tokens``).

vLLM's hybrid KV-cache manager keeps the KV of each layer kind in its own group: Laguna's
sliding layers in sliding-window groups (a hit needs only the blocks inside the window)
beside the full-attention group, Llama 4's chunked layers in chunked-local groups (vLLM
0.32's and 0.33's default; ``VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=0`` would
keep full-attention KV for them instead). The test asserts which group kinds the engine built.
"""

from __future__ import annotations

import pytest

from harness import Greedy, assert_parity, prompts_for, shutdown, start_engine
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.llama4 import build_llama4

pytestmark = pytest.mark.slow

BLOCK = 128  # vLLM's CPU KV block size
PREFIX = 3 * BLOCK + 60  # three whole blocks shared, then a partial one
SUFFIXES = [7, 19, 40]
SHARED = prompts_for(512, [PREFIX])[0]
PROMPTS = [SHARED + suffix for suffix in prompts_for(512, SUFFIXES, seed=1)]

#: model -> (builder, options, the KV-cache group kinds vLLM must build). Window 160 is
#: shorter than the shared prefix, longer than a block and not block-aligned; chunk 256 puts
#: a chunk boundary inside the shared prefix.
MODELS = {
    "laguna-sliding-window": (build_laguna, dict(sliding_window=160), {"FullAttentionSpec", "SlidingWindowSpec"}),
    "llama4-chunked": (build_llama4, dict(attention_chunk_size=256), {"FullAttentionSpec", "ChunkedLocalAttentionSpec"}),
}


def _greedy(llm, prompts) -> tuple[list[Greedy], list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [Greedy.from_output(o) for o in outputs], [o.num_cached_tokens for o in outputs]


def _run(ckpt, prefix_caching: bool):
    """Greedy decoding of the first prompt, then of all of them (its cache, if on, warm).
    Returns the second batch's results and cached-token counts, the first prompt's count,
    and the kinds of the engine's KV-cache groups."""

    llm = start_engine(ckpt, enable_prefix_caching=prefix_caching)
    try:
        groups = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_config.kv_cache_groups
        kinds = {type(group.kv_cache_spec).__name__ for group in groups}
        _, (first_cached,) = _greedy(llm, PROMPTS[:1])
        results, cached = _greedy(llm, PROMPTS)
    finally:
        shutdown(llm)
    return results, cached, first_cached, kinds


@pytest.fixture(scope="module")
def without_prefix_caching(tmp_path_factory):
    """model -> (checkpoint, greedy results with prefix caching off)."""
    runs = {}
    for model, (build, options, _) in MODELS.items():
        ckpt = build(tmp_path_factory.mktemp(model) / "ckpt", **options)
        results, cached, _, _ = _run(ckpt, prefix_caching=False)
        assert cached == [0] * len(PROMPTS)
        runs[model] = (ckpt, results)
    return runs


def test_the_shared_prefix_passes_the_window_and_several_blocks():
    windows = [options.get("sliding_window") or options["attention_chunk_size"] for _, options, _ in MODELS.values()]
    assert max(windows) < PREFIX and PREFIX > 2 * BLOCK
    assert all(p[:PREFIX] == SHARED for p in PROMPTS) and len({p[PREFIX] for p in PROMPTS}) > 1


@pytest.mark.parametrize("model", list(MODELS))
def test_prefix_caching_changes_no_output(model, without_prefix_caching):
    ckpt, expected = without_prefix_caching[model]
    actual, cached, first_cached, kinds = _run(ckpt, prefix_caching=True)
    assert kinds == MODELS[model][2]
    assert first_cached == 0
    # every prompt of the second batch reads the three whole shared blocks from the cache
    assert cached == [3 * BLOCK] * len(PROMPTS), cached
    assert_parity(expected, actual)
