"""The conv state under vLLM's scheduler: continuous batching, prefix caching, slot release
and reuse, chunked prefill and preemption, each request checked against transformers
running it alone.

Requests of 1 to 300 tokens arrive at different engine steps, so short ones join while long
ones are mid-prompt or decoding (``max_num_seqs=3`` keeps some waiting for a free slot).
vLLM's defaults are on: prefix caching (``mamba_cache_mode="align"``) and chunked prefill.
"""

from __future__ import annotations

import pytest

from harness import assert_parity, hf_greedy, prompts_for
from lfm2_helpers import make_engine, run_engine, shutdown_engine
from vllm_laguna.tiny.lfm2 import build_lfm2

MAX_NEW = 32
LENGTHS = {"a": 300, "b": 1, "c": 7, "d": 150, "e": 2, "f": 40}
ARRIVAL_STEP = {"a": 0, "b": 0, "c": 3, "d": 5, "e": 9, "f": 12}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_lfm2(tmp_path_factory.mktemp("lfm2") / "ckpt", conv_bias=True, seed=4)


@pytest.fixture(scope="module")
def prompts():
    prompts = dict(zip(LENGTHS, prompts_for(512, list(LENGTHS.values()), seed=3)))
    # shares its first 260 tokens (two full 128-token blocks) with "a"
    prompts["g"] = prompts["a"][:260] + prompts_for(512, [30], seed=9)[0]
    return prompts


@pytest.fixture(scope="module")
def reference(ckpt, prompts):
    """transformers, each request alone."""
    return dict(zip(prompts, hf_greedy(ckpt, list(prompts.values()), max_new_tokens=MAX_NEW)))


def _arrivals(prompts, names):
    return [(ARRIVAL_STEP.get(n, 0), n, prompts[n]) for n in names]


@pytest.fixture(scope="module")
def default_engine(ckpt, prompts):
    """One engine with vLLM's defaults, driven through four runs in turn."""
    engine = make_engine(ckpt, max_num_seqs=3)
    pool = engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    try:
        free_at_start = pool.get_num_free_blocks()
        runs = {
            "mixed": run_engine(engine, _arrivals(prompts, LENGTHS), MAX_NEW),
            "prefix": run_engine(engine, _arrivals(prompts, ["g"]), MAX_NEW),
            "alone-c": run_engine(engine, _arrivals(prompts, ["c"]), MAX_NEW),
            "alone-a": run_engine(engine, _arrivals(prompts, ["a"]), MAX_NEW),
        }
        runs["free_blocks"] = (free_at_start, pool.get_num_free_blocks())
        yield runs
    finally:
        shutdown_engine(engine)


def test_requests_joining_while_others_decode_equal_each_alone(default_engine, reference):
    run = default_engine["mixed"]
    assert run.max_running == 3, "requests did not overlap"
    assert_parity([reference[n] for n in LENGTHS], [run.results[n] for n in LENGTHS])


def test_prefix_cache_hit_resumes_from_the_cached_conv_state(default_engine, reference):
    """"g" reuses "a"'s first two blocks, conv states included, and still equals transformers."""
    run = default_engine["prefix"]
    assert run.cached_tokens["g"] >= 256, run.cached_tokens
    assert_parity([reference["g"]], [run.results["g"]])


def test_finished_requests_release_their_slots_and_repeat_exactly(default_engine):
    """Every block (KV blocks and conv-state slots) comes back when requests finish, and a
    request run again alone later gives what it gave in the mixed batch."""
    free_at_start, free_at_end = default_engine["free_blocks"]
    assert free_at_end == free_at_start
    mixed = default_engine["mixed"].results
    for name in ("c", "a"):
        alone = default_engine[f"alone-{name}"].results[name]
        assert_parity([mixed[name]], [alone], atol=1e-5)


def test_chunked_prefill_and_preemption(ckpt, prompts, reference, default_engine):
    """Prompts split into 32-token chunks (a 300-token prompt over ten steps), and a cache of
    9 blocks, too small for all requests: the scheduler preempts one and later recomputes it
    (with prefix caching, in "align" mode, a request holds a state block per 128 tokens,
    which is what makes the cache run out). Slots are reused: the six requests hold three
    blocks or more each (two conv-state groups and one attention group), 18 or more
    allocations from 8 usable blocks, so each block serves several requests in turn."""
    engine = make_engine(
        ckpt, max_num_seqs=3, max_num_batched_tokens=32, max_model_len=384, num_gpu_blocks_override=9
    )
    scheduler = engine.engine_core.engine_core.scheduler
    try:
        groups = len(scheduler.kv_cache_config.kv_cache_groups)
        free_at_start = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
        run = run_engine(engine, _arrivals(prompts, LENGTHS), MAX_NEW)
        free_at_end = scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    finally:
        shutdown_engine(engine)
    assert groups * len(LENGTHS) > free_at_start == free_at_end, (groups, free_at_start, free_at_end)
    assert sum(run.preemptions.values()) >= 1, "nothing was preempted"
    assert run.max_step_tokens <= 32 < max(LENGTHS.values()), "prompts were not chunked"
    assert_parity([reference[n] for n in LENGTHS], [run.results[n] for n in LENGTHS])
    default = default_engine["mixed"].results
    assert_parity([default[n] for n in LENGTHS], [run.results[n] for n in LENGTHS], atol=1e-5)
