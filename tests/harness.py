"""Parity harness: greedy decoding with transformers and with vLLM + this plugin.

vLLM runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni``
executor, set in ``conftest.py``): the same engine, scheduler and model runner users get,
without paying three interpreter start-ups per checkpoint. Runs that need several processes
(tensor parallelism, the compiled default mode, the server) start their own.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

#: the bar of the issues: identical greedy tokens and top-5 logprobs within this
LOGPROB_ATOL = 1e-3


@dataclass
class Greedy:
    """One greedy continuation: generated ids and, per step, the top-5 logprobs."""

    tokens: list[int]
    top5: list[dict[int, float]] = field(default_factory=list)

    @classmethod
    def from_output(cls, output, num_logprobs: int = 5) -> "Greedy":
        """From a vLLM ``RequestOutput`` sampled with ``logprobs=num_logprobs``."""
        completion = output.outputs[0]
        top = [
            {tok: lp.logprob for tok, lp in sorted(step.items(), key=lambda kv: kv[1].rank)[:num_logprobs]}
            for step in completion.logprobs
        ]
        return cls(tokens=list(completion.token_ids), top5=top)


def engine_kwargs(model_dir: str | Path, dtype: str = "float32", **overrides) -> dict:
    """vLLM engine arguments of the parity runs: in-process, eager, seeded; ``overrides`` win."""
    kwargs = dict(
        model=str(model_dir),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=16,
        seed=0,
        distributed_executor_backend="uni",
    )
    kwargs.update(overrides)
    return kwargs


def prompts_for(vocab_size: int, lengths: Sequence[int], seed: int = 0, low: int = 32) -> list[list[int]]:
    """Random prompts of the given lengths from the non-special part of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@torch.no_grad()
def hf_greedy(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    dtype: torch.dtype = torch.float32,
    model_cls=None,
    num_logprobs: int = 5,
) -> list[Greedy]:
    """Greedy decoding with transformers' model class for the checkpoint (KV cache on);
    ``Greedy.top5`` holds the ``num_logprobs`` best tokens of each step."""
    from transformers import AutoModelForCausalLM

    model = (model_cls or AutoModelForCausalLM).from_pretrained(str(model_dir), dtype=dtype)
    model.eval()
    results = []
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        out = model(input_ids=ids, use_cache=True)
        greedy = Greedy(tokens=[])
        for step in range(max_new_tokens):
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            top = torch.topk(logprobs, num_logprobs)
            greedy.top5.append(dict(zip(top.indices.tolist(), top.values.tolist())))
            token = int(top.indices[0])
            greedy.tokens.append(token)
            if step + 1 < max_new_tokens:
                out = model(
                    input_ids=torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True
                )
        results.append(greedy)
    del model
    gc.collect()
    return results


def vllm_greedy(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    dtype: str = "float32",
    **llm_kwargs,
) -> list[Greedy]:
    """Greedy decoding with vLLM's offline ``LLM`` on this plugin; all prompts in one batch."""
    return vllm_run(model_dir, prompts, max_new_tokens, dtype, **llm_kwargs)[0]


def vllm_run(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    dtype: str = "float32",
    inspect=None,
    num_logprobs: int = 5,
    **llm_kwargs,
):
    """:func:`vllm_greedy`, and ``inspect(model)`` run on the loaded model (via
    ``LLM.apply_model``) before generating. Returns ``(greedy results, inspect result)``."""
    from vllm import LLM

    llm = LLM(**engine_kwargs(model_dir, dtype, **llm_kwargs))
    try:
        inspected = llm.apply_model(inspect)[0] if inspect is not None else None
        greedy = generate_greedy(llm, prompts, max_new_tokens, num_logprobs)
    finally:
        shutdown(llm)
    return greedy, inspected


def generate_greedy(llm, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_logprobs: int = 5) -> list[Greedy]:
    """Greedy continuations of ``prompts`` from a running ``LLM``, with top-``num_logprobs``."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens, logprobs=num_logprobs, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    return [Greedy.from_output(o, num_logprobs) for o in outputs]


@dataclass
class SpecStats:
    """vLLM's speculative-decoding counters of one engine run."""

    num_drafts: int
    num_draft_tokens: int
    #: accepted draft tokens by position in the draft (first, second, ...)
    accepted_per_position: list[int]

    @property
    def acceptance_rate(self) -> float:
        return sum(self.accepted_per_position) / max(self.num_draft_tokens, 1)

    def __str__(self) -> str:
        return (
            f"acceptance {sum(self.accepted_per_position)}/{self.num_draft_tokens} draft tokens "
            f"({self.acceptance_rate:.1%}) in {self.num_drafts} drafts, by position {self.accepted_per_position}"
        )


def vllm_spec_run(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    speculative_config: dict,
    max_new_tokens: int = 32,
    dtype: str = "float32",
    **llm_kwargs,
) -> tuple[list[Greedy], SpecStats]:
    """:func:`vllm_greedy` with speculative decoding, and the engine's acceptance counters."""
    from vllm import LLM

    llm = LLM(
        **engine_kwargs(
            model_dir, dtype, speculative_config=speculative_config, disable_log_stats=False, **llm_kwargs
        )
    )
    try:
        greedy = generate_greedy(llm, prompts, max_new_tokens, num_logprobs=5)
        counters = {m.name.removeprefix("vllm:spec_decode_"): m for m in llm.get_metrics()}
    finally:
        shutdown(llm)
    stats = SpecStats(
        num_drafts=int(counters["num_drafts"].value),
        num_draft_tokens=int(counters["num_draft_tokens"].value),
        accepted_per_position=[int(v) for v in counters["num_accepted_tokens_per_pos"].values],
    )
    return greedy, stats


def shutdown(llm) -> None:
    """Tear an in-process engine down so the next ``LLM`` can start in this process."""
    from vllm.distributed import cleanup_dist_env_and_memory

    engine = getattr(llm, "llm_engine", None)
    if engine is not None and hasattr(engine, "engine_core"):
        engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def max_logprob_gap(expected: Greedy, actual: Greedy) -> float:
    """Largest |difference| between the two sides' logprobs of the tokens both rank top-5."""
    gap = 0.0
    for want, got in zip(expected.top5, actual.top5):
        for token in want.keys() & got.keys():
            gap = max(gap, abs(want[token] - got[token]))
    return gap


def assert_parity(
    expected: Sequence[Greedy], actual: Sequence[Greedy], atol: float = LOGPROB_ATOL, min_tokens: int = 32
) -> float:
    """Identical greedy tokens, the same top-5 sets (up to a near-tie at rank 5), and the
    top-5 logprobs within ``atol``. Returns the largest gap seen."""
    worst = 0.0
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert len(want.tokens) >= min_tokens and want.tokens == got.tokens, (
            f"prompt {i}: greedy tokens differ\n transformers: {want.tokens}\n vllm:         {got.tokens}"
        )
        for step, (w, g) in enumerate(zip(want.top5, got.top5)):
            for token in w.keys() ^ g.keys():  # only a near-tie at the edge may swap places
                side = w if token in w else g
                assert side[token] - min(side.values()) <= atol, (
                    f"prompt {i} step {step}: top-5 sets differ ({sorted(w)} vs {sorted(g)})"
                )
        gap = max_logprob_gap(want, got)
        assert gap <= atol, f"prompt {i}: top-5 logprob gap {gap:.3g} > {atol}"
        worst = max(worst, gap)
    assert not math.isnan(worst)
    return worst


def assert_close_greedy_bf16(expected: Sequence[Greedy], actual: Sequence[Greedy]) -> int:
    """vLLM's low-precision convention (its ``check_logprobs_close``): the sequences may part
    ways, but at the first differing step each side's token must be in the other's top-5.
    Returns how many sequences matched all the way."""
    identical = 0
    for i, (want, got) in enumerate(zip(expected, actual, strict=True)):
        for step, (w_tok, g_tok) in enumerate(zip(want.tokens, got.tokens)):
            if w_tok != g_tok:
                assert w_tok in got.top5[step] and g_tok in want.top5[step], (
                    f"prompt {i} step {step}: transformers chose {w_tok}, vllm {g_tok}; "
                    f"not in each other's top-5 ({sorted(want.top5[step])} / {sorted(got.top5[step])})"
                )
                break
        else:
            identical += 1
    return identical
