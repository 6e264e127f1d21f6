"""Shared pieces of the LFM2 tests: a per-request conv reference written the way
transformers' ``Lfm2ShortConv`` computes it, and the kernel-contract checks that run against
both the torch and (under the Triton interpreter) the Triton implementations."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from harness import Greedy

TOLERANCE = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    # the Triton interpreter truncates fp32 -> bf16 where the GPU rounds: two bf16 ulps
    torch.bfloat16: dict(rtol=2**-6, atol=1e-3),
}


@dataclass
class ConvBatch:
    """Inputs of one conv step over several requests (see kernels/causal_conv1d.py)."""

    x: torch.Tensor  # [T, D]
    weight: torch.Tensor  # [D, L]
    bias: torch.Tensor | None
    conv_state: torch.Tensor  # [num_slots, D, S] view
    query_start_loc: torch.Tensor  # [R + 1] int32
    slots: torch.Tensor  # [R] int32
    has_initial_state: torch.Tensor  # [R] bool

    @property
    def lens(self) -> list[int]:
        return torch.diff(self.query_start_loc).tolist()


def conv_state_buffer(num_slots: int, dim: int, state_len: int, dtype, layout: str, seed: int) -> torch.Tensor:
    """A random state cache viewed as ``[num_slots, D, S]``; ``SD`` stores it as vLLM does by
    default (``[num_slots, S, D]``, so the view is strided), ``DS`` contiguously."""
    gen = torch.Generator().manual_seed(seed)
    if layout == "SD":
        return torch.randn(num_slots, state_len, dim, generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(num_slots, dim, state_len, generator=gen).to(dtype)


def conv_batch(
    lens: Sequence[int],
    slots: Sequence[int],
    has_initial_state: Sequence[bool],
    dim: int = 40,
    kernel: int = 3,
    bias: bool = True,
    dtype=torch.float32,
    layout: str = "SD",
    num_slots: int = 8,
    seed: int = 0,
) -> ConvBatch:
    gen = torch.Generator().manual_seed(seed + 1)
    qsl = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    return ConvBatch(
        x=torch.randn(int(qsl[-1]), dim, generator=gen).to(dtype),
        weight=(torch.randn(dim, kernel, generator=gen) * 0.5).to(dtype),
        bias=(torch.randn(dim, generator=gen) * 0.3).to(dtype) if bias else None,
        conv_state=conv_state_buffer(num_slots, dim, kernel - 1, dtype, layout, seed),
        query_start_loc=qsl,
        slots=torch.tensor(slots, dtype=torch.int32),
        has_initial_state=torch.tensor(has_initial_state, dtype=torch.bool),
    )


def reference_conv(
    batch: ConvBatch, initial: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Request by request, as transformers does: ``F.conv1d`` over ``[state ; x]`` (zeros for
    a fresh request), output the last n positions, keep the last S inputs as the new state.

    ``initial``: a copy of the state cache taken before the step. Returns the output and,
    per request, the new state ``[D, S]`` (None where the request has no slot)."""
    dim, kernel = batch.weight.shape
    outs, states = [], []
    for r, n in enumerate(batch.lens):
        start = int(batch.query_start_loc[r])
        slot = int(batch.slots[r])
        x = batch.x[start : start + n].T.float()  # [D, n]
        if slot >= 0 and batch.has_initial_state[r]:
            state = initial[slot].float()
        else:
            state = torch.zeros(dim, kernel - 1)
        window = torch.cat([state, x], dim=-1)
        bias = None if batch.bias is None else batch.bias.float()
        outs.append(F.conv1d(window[None], batch.weight.float()[:, None, :], bias, groups=dim)[0].T)
        states.append(window[:, -(kernel - 1) :] if slot >= 0 else None)
    return torch.cat(outs).to(batch.x.dtype), states


PrefillFn = Callable[..., torch.Tensor]
DecodeFn = Callable[..., torch.Tensor]


def run_prefill(prefill: PrefillFn, batch: ConvBatch) -> torch.Tensor:
    return prefill(
        batch.x,
        batch.weight,
        batch.bias,
        batch.conv_state,
        batch.query_start_loc,
        batch.slots,
        batch.has_initial_state,
    )


def assert_prefill_matches_reference(prefill: PrefillFn, batch: ConvBatch) -> None:
    """Outputs and the written slots equal the reference; no other slot changes at all."""
    initial = batch.conv_state.clone()
    _assert_step_matches_reference(batch, initial, run_prefill(prefill, batch))


def assert_decode_matches_reference(decode: DecodeFn, batch: ConvBatch) -> None:
    """One token per request: output and the shifted slot equal the reference; no other
    slot changes at all."""
    assert batch.lens == [1] * len(batch.lens) and bool(batch.has_initial_state.all())
    initial = batch.conv_state.clone()
    out = decode(batch.x, batch.weight, batch.bias, batch.conv_state, batch.slots)
    _assert_step_matches_reference(batch, initial, out)


def _assert_step_matches_reference(batch: ConvBatch, initial: torch.Tensor, out: torch.Tensor) -> None:
    tol = TOLERANCE[batch.x.dtype]
    want_out, want_states = reference_conv(batch, initial)
    torch.testing.assert_close(out, want_out, **tol)
    written = set()
    for slot, state in zip(batch.slots.tolist(), want_states):
        if state is not None:
            torch.testing.assert_close(batch.conv_state[slot], state.to(batch.x.dtype), **tol)
            written.add(slot)
    for slot in range(batch.conv_state.shape[0]):
        if slot not in written:
            assert torch.equal(batch.conv_state[slot], initial[slot]), f"slot {slot} was touched"


def assert_chunked_equals_whole(prefill: PrefillFn, decode: DecodeFn, dtype=torch.float32) -> None:
    """Two requests whose prompts arrive in chunks (a later chunk reads the state the earlier
    one wrote), then decode: every output equals one conv over each whole sequence."""
    dim, kernel, seed = 72, 4, 3
    chunks = {0: [5, 1, 9], 1: [2, 2, 4]}  # request -> prompt chunk sizes
    decode_steps = 3
    slots = {0: 6, 1: 2}
    totals = {r: sum(c) + decode_steps for r, c in chunks.items()}
    whole = conv_batch(
        [totals[0], totals[1]], [0, 1], [False, False], dim=dim, kernel=kernel, dtype=dtype, seed=seed
    )
    want, _ = reference_conv(whole, whole.conv_state.clone())
    seqs = {r: whole.x[int(whole.query_start_loc[r]) : int(whole.query_start_loc[r + 1])] for r in (0, 1)}
    wants = {r: want[int(whole.query_start_loc[r]) : int(whole.query_start_loc[r + 1])] for r in (0, 1)}
    state = conv_state_buffer(8, dim, kernel - 1, dtype, "SD", seed=11)  # garbage in every slot
    got = {0: [], 1: []}
    done = {0: 0, 1: 0}
    for step in range(3):  # both requests prefill one chunk per step, in one batch
        lens = [chunks[0][step], chunks[1][step]]
        x = torch.cat([seqs[r][done[r] : done[r] + lens[r]] for r in (0, 1)])
        qsl = torch.tensor([0, lens[0], lens[0] + lens[1]], dtype=torch.int32)
        out = prefill(
            x, whole.weight, whole.bias, state, qsl,
            torch.tensor([slots[0], slots[1]], dtype=torch.int32),
            torch.tensor([step > 0, step > 0]),
        )  # fmt: skip
        got[0].append(out[: lens[0]])
        got[1].append(out[lens[0] :])
        done = {r: done[r] + lens[r] for r in (0, 1)}
    for _ in range(decode_steps):
        x = torch.stack([seqs[r][done[r]] for r in (1, 0)])  # decode order differs from prefill
        out = decode(x, whole.weight, whole.bias, state, torch.tensor([slots[1], slots[0]], dtype=torch.int32))
        got[1].append(out[:1])
        got[0].append(out[1:])
        done = {r: done[r] + 1 for r in (0, 1)}
    tol = TOLERANCE[dtype]
    for r in (0, 1):
        torch.testing.assert_close(torch.cat(got[r]), wants[r], **tol)


#: prefill batches: name -> conv_batch kwargs. Lengths shorter and longer than the state,
#: fresh and continuing requests, slots out of order, both state layouts, kernels 2..4,
#: channel counts that leave partial blocks, with and without bias, and a request without
#: a slot (negative index).
PREFILL_CASES = {
    "mixed-k3": dict(lens=[1, 2, 5, 37], slots=[5, 0, 3, 6], has_initial_state=[False, True, True, False]),
    "k2-ds-nobias": dict(
        lens=[3, 1, 20], slots=[1, 7, 4], has_initial_state=[True, True, False],
        kernel=2, layout="DS", bias=False, dim=130,
    ),
    "k4-wide": dict(
        lens=[2, 1, 19, 4], slots=[2, 3, 0, 1], has_initial_state=[True, False, True, True], kernel=4, dim=130
    ),
    "no-slot": dict(lens=[3, 4], slots=[-1, 2], has_initial_state=[True, True]),
}  # fmt: skip
DECODE_CASES = {
    "k3": dict(lens=[1, 1, 1], slots=[3, 0, 7], has_initial_state=[True] * 3),
    "k2-ds": dict(lens=[1, 1], slots=[6, 1], has_initial_state=[True] * 2, kernel=2, layout="DS", dim=130),
    "k4-nobias": dict(lens=[1] * 4, slots=[0, 5, 2, 4], has_initial_state=[True] * 4, kernel=4, bias=False),
    "no-slot": dict(lens=[1, 1], slots=[4, -1], has_initial_state=[True] * 2),
}


def assert_fresh_request_ignores_stale_slot(prefill: PrefillFn) -> None:
    """A request starting fresh in a reused slot must not read what the slot holds, even
    NaN (a slot vLLM never wrote is uninitialised memory)."""
    batch = conv_batch([4, 6], [1, 3], [False, True])
    batch.conv_state[1] = float("nan")
    assert_prefill_matches_reference(prefill, batch)
    assert not batch.conv_state.isnan()[1].any()


# ---------------------------------------------------------------------------------------
# driving vLLM's engine step by step
# ---------------------------------------------------------------------------------------


@dataclass
class EngineRun:
    """What a step-by-step engine run produced, per request id, and what the scheduler did."""

    results: dict[str, "Greedy"]
    preemptions: dict[str, int]
    cached_tokens: dict[str, int]
    #: most requests running at once
    max_running: int
    #: most tokens scheduled in one step (a prompt longer than this was chunked)
    max_step_tokens: int


def run_engine(
    engine,
    arrivals: Sequence[tuple[int, str, Sequence[int]]],
    max_new_tokens: int,
) -> EngineRun:
    """Feeds ``(step, request_id, prompt)`` arrivals into a ``LLMEngine`` at the given step
    numbers (a request joins while the earlier ones are mid-prompt or decoding) and steps
    until all finish. Greedy, top-5 logprobs, ``ignore_eos``."""
    from vllm import SamplingParams

    from harness import Greedy

    scheduler = engine.engine_core.engine_core.scheduler
    preemptions: dict[str, int] = {}
    preempt = scheduler._preempt_request

    def counting_preempt(request, *args, **kwargs):
        preemptions[request.request_id] = preemptions.get(request.request_id, 0) + 1
        return preempt(request, *args, **kwargs)

    step_tokens: list[int] = []
    schedule = scheduler.schedule

    def recording_schedule(*args, **kwargs):
        output = schedule(*args, **kwargs)
        step_tokens.append(output.total_num_scheduled_tokens)
        return output

    scheduler._preempt_request = counting_preempt
    scheduler.schedule = recording_schedule
    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=5, ignore_eos=True)
    pending = sorted(arrivals, key=lambda a: a[0])
    results, cached, step, max_running = {}, {}, 0, 0
    try:
        while pending or engine.has_unfinished_requests():
            while pending and pending[0][0] <= step:
                _, request_id, prompt = pending.pop(0)
                engine.add_request(request_id, {"prompt_token_ids": list(prompt)}, params)
            max_running = max(max_running, len(scheduler.running))
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = Greedy.from_output(output)
                    cached[output.request_id] = output.num_cached_tokens or 0
            step += 1
    finally:
        scheduler._preempt_request = preempt
        scheduler.schedule = schedule
    return EngineRun(results, preemptions, cached, max_running, max(step_tokens, default=0))


def make_engine(model_dir, **overrides):
    """An in-process ``LLMEngine`` set up like ``harness.vllm_greedy``'s ``LLM``."""
    from vllm import EngineArgs, LLMEngine

    from harness import engine_kwargs

    return LLMEngine.from_engine_args(EngineArgs(**engine_kwargs(model_dir, **overrides)))


def shutdown_engine(engine) -> None:
    import gc

    from vllm.distributed import cleanup_dist_env_and_memory

    engine.engine_core.shutdown()
    del engine
    gc.collect()
    cleanup_dist_env_and_memory()
