"""Parity harness: greedy decoding with transformers and with vLLM + this plugin.

vLLM runs in the test process (``VLLM_ENABLE_V1_MULTIPROCESSING=0`` and the ``uni``
executor, set in ``conftest.py``): the same engine, scheduler and model runner users get,
without paying three interpreter start-ups per checkpoint. Runs that need several processes
(tensor parallelism, the compiled default mode, the server) start their own.
"""

from __future__ import annotations

import copy
import gc
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

#: The fp32 parity bound: identical greedy tokens and top-5 logprobs within this. The models
#: measure 1e-6 to 1e-5 against transformers (see the "parity" section every pytest run
#: prints); the bound leaves room for other CPUs' summation orders (AVX-512/AMX, TP) and
#: still catches an fp32 model rounding one op to bf16 (an error of ~1e-3).
LOGPROB_ATOL = 1e-4
#: What a feature a parity configuration covers must change in transformers' own output
#: (top-5 logprobs) for that parity test to be able to fail without it.
FEATURE_EFFECT = 10 * LOGPROB_ATOL

#: worst gap of every assert_parity call of the running test, by test (conftest reports them)
PARITY_GAPS: dict[str, float] = {}
#: what turning a feature off did to transformers' output, by test (conftest reports them)
FEATURE_EFFECTS: dict[str, float] = {}


@dataclass
class Greedy:
    """One greedy continuation: generated ids and, per step, the top-5 logprobs.

    ``prompt_top5[i]`` (vLLM runs with ``prompt_logprobs``) holds the top-5 logprobs of the
    prediction of prompt token ``i + 1`` from the prompt's first ``i + 1`` tokens (the
    prefill path at every position)."""

    tokens: list[int]
    top5: list[dict[int, float]] = field(default_factory=list)
    prompt_top5: list[dict[int, float]] = field(default_factory=list)

    @classmethod
    def from_output(cls, output, num_logprobs: int = 5) -> "Greedy":
        """From a vLLM ``RequestOutput`` sampled with ``logprobs=num_logprobs``."""
        completion = output.outputs[0]
        prompt_steps = (output.prompt_logprobs or [None])[1:]
        return cls(
            tokens=list(completion.token_ids),
            top5=[_ranked(step, num_logprobs) for step in completion.logprobs],
            prompt_top5=[_ranked(step, 5) for step in prompt_steps],
        )


def _ranked(step, n: int) -> dict[int, float]:
    return {tok: lp.logprob for tok, lp in sorted(step.items(), key=lambda kv: kv[1].rank)[:n]}


#: the KV cache of a test engine: thousands of tokens for these tiny models, where vLLM's
#: CPU minimum through ``VLLM_CPU_KVCACHE_SPACE`` (1 GiB) took ~1.3 s of each engine's start
#: and shutdown to allocate, profile and free
KV_CACHE_BYTES = 128 << 20


def engine_kwargs(model_dir: str | Path, dtype: str = "float32", **overrides) -> dict:
    """vLLM engine arguments of the parity runs: in-process, eager, seeded, a small KV cache;
    ``overrides`` win."""
    kwargs = dict(
        model=str(model_dir),
        dtype=dtype,
        enforce_eager=True,
        max_model_len=1024,
        max_num_seqs=16,
        seed=0,
        distributed_executor_backend="uni",
        kv_cache_memory_bytes=KV_CACHE_BYTES,
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
    results = hf_model_greedy(model, prompts, max_new_tokens, num_logprobs)
    del model
    gc.collect()
    return results


@torch.no_grad()
def hf_model_greedy(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, num_logprobs: int = 5
) -> list[Greedy]:
    """:func:`hf_greedy` on a transformers (or peft) model object already loaded."""
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
    prompt_logprobs: bool = False,
    **llm_kwargs,
):
    """:func:`vllm_greedy`, and ``inspect(model)`` run on the loaded model (via
    ``LLM.apply_model``) before generating; ``prompt_logprobs`` fills ``Greedy.prompt_top5``.
    Returns ``(greedy results, inspect result)``."""
    llm = start_engine(model_dir, dtype, **llm_kwargs)
    try:
        inspected = llm.apply_model(inspect)[0] if inspect is not None else None
        greedy = generate_greedy(llm, prompts, max_new_tokens, num_logprobs, prompt_logprobs)
    finally:
        shutdown(llm)
    return greedy, inspected


def generate_greedy(
    llm, prompts: Sequence[Sequence[int]], max_new_tokens: int, num_logprobs: int = 5, prompt_logprobs: bool = False
) -> list[Greedy]:
    """Greedy continuations of ``prompts`` from a running ``LLM``, with top-``num_logprobs``
    (and the prompt's top-5 with ``prompt_logprobs``)."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_new_tokens,
        logprobs=num_logprobs,
        prompt_logprobs=5 if prompt_logprobs else None,
        ignore_eos=True,
    )
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
    llm = start_engine(
        model_dir, dtype, speculative_config=speculative_config, disable_log_stats=False, **llm_kwargs
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


def load_error(model_dir: str | Path, dtype: str = "bfloat16", **llm_kwargs) -> str:
    """What vLLM says when it refuses to load ``model_dir`` with these engine arguments: the
    messages of the raised exception and its causes. Fails if the engine loads."""
    try:
        llm = start_engine(model_dir, dtype, **llm_kwargs)
    except Exception as error:  # noqa: BLE001 - whatever vLLM raises is what the user sees
        messages = []
        while error is not None:
            messages.append(f"{type(error).__name__}: {error}")
            error = error.__cause__ or error.__context__
        return "\n".join(messages)
    shutdown(llm)
    raise AssertionError(f"vLLM loaded {model_dir} with {llm_kwargs} and dtype={dtype}")


def start_engine(model_dir: str | Path, dtype: str = "float32", **llm_kwargs):
    """``LLM(**engine_kwargs(...))`` in this process. An engine that fails to start (a test of a
    load error) has already set up vLLM's distributed groups; they are torn down before the
    error propagates, or the next engine or process group in this pytest worker would find
    them up ("tensor model parallel group is already initialized")."""
    from vllm import LLM
    from vllm.distributed import cleanup_dist_env_and_memory

    try:
        return LLM(**engine_kwargs(model_dir, dtype, **llm_kwargs))
    except BaseException:
        gc.collect()
        cleanup_dist_env_and_memory()
        raise


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
    _record_gap(worst)
    return worst


def _record_gap(gap: float, record: dict[str, float] = PARITY_GAPS) -> None:
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
    record[test] = max(gap, record.get(test, 0.0))


@dataclass(frozen=True)
class FeatureOff:
    """How to turn one feature off in transformers: config changes and/or parameters to zero."""

    config: dict = field(default_factory=dict)
    zero: tuple[str, ...] = ()


@torch.no_grad()
def reference_logprobs(
    model_dir: str | Path,
    prompts: Sequence[Sequence[int]],
    config_changes: dict | None = None,
    zero: Sequence[str] = (),
) -> list[torch.Tensor]:
    """transformers' logprobs ``[len(prompt), vocab]`` at every position of each prompt (fp32),
    in one forward pass per prompt (row ``j`` predicts token ``j + 1``). With
    ``config_changes`` applied to the checkpoint's config and the parameters whose names
    contain any of ``zero`` zeroed: the reference with one feature turned off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    target = getattr(config, "text_config", None) or config
    for key, value in (config_changes or {}).items():
        setattr(target, key, value)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=config, dtype=torch.float32)
    model.eval()
    zeroed = [p for name, p in model.named_parameters() if any(z in name for z in zero)]
    assert len(zeroed) > 0 or not zero, f"no parameter named like {list(zero)}"
    for param in zeroed:
        param.zero_()
    out = [torch.log_softmax(model(input_ids=torch.tensor([list(p)])).logits[0].float(), -1) for p in prompts]
    del model
    gc.collect()
    return out


def feature_effect(baseline: Sequence[torch.Tensor], changed: Sequence[torch.Tensor]) -> float:
    """Largest change of a top-5 logprob (the baseline's top-5 at each position)."""
    effect = 0.0
    for want, got in zip(baseline, changed, strict=True):
        top = want.topk(5, dim=-1).indices
        effect = max(effect, (want.gather(-1, top) - got.gather(-1, top)).abs().max().item())
    return effect


def assert_feature_changes_reference(
    model_dir: str | Path, prompts: Sequence[Sequence[int]], baseline: Sequence[torch.Tensor], off: FeatureOff
) -> float:
    """transformers' output with the feature turned off differs from ``baseline`` by more
    than :data:`FEATURE_EFFECT`: a model ignoring the feature fails the parity test."""
    changed = reference_logprobs(model_dir, prompts, off.config, off.zero)
    effect = feature_effect(baseline, changed)
    _record_gap(effect, FEATURE_EFFECTS)
    assert effect > FEATURE_EFFECT, f"turning {off} off changes transformers' top-5 logprobs by only {effect:.2g}"
    return effect


def keys_left_at_default(parse: Callable, configs: Sequence[dict]) -> list[str]:
    """The config keys ``parse`` reads that hold its default value in every one of ``configs``.

    ``configs`` are raw ``config.json`` dicts. A key counts as set when removing it from
    some config changes what ``parse`` returns (or makes it raise): that config holds a value
    other than the parser's default. Keys inside dict values (a rope dict, rope dicts per
    layer type) count one by one, as ``rope_parameters.full_attention.factor``. A key read
    but absent from every config is left at its default too. A parity test on configs that
    leave a key at its default cannot tell a model that ignores the key.
    """
    from vllm_laguna.configs import ConfigError

    read: set[str] = set()

    class Recording(SimpleNamespace):
        def __getattribute__(self, name):
            read.add(name)
            return super().__getattribute__(name)

    for raw in configs:
        parse(Recording(**raw))
    paths = {(key,) for key in read if not key.startswith("_")}
    paths |= {path for raw in configs for key in raw if key in read for path in _leaf_paths(raw[key], (key,))}

    def matters(raw: dict, path: tuple) -> bool:
        reduced = copy.deepcopy(raw)
        parent = reduced
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or path[-1] not in parent:
            return False
        del parent[path[-1]]
        try:
            return parse(SimpleNamespace(**reduced)) != parse(SimpleNamespace(**raw))
        except ConfigError:
            return True

    return sorted(".".join(path) for path in paths if not any(matters(raw, path) for raw in configs))


def _leaf_paths(value, prefix: tuple):
    if isinstance(value, dict):
        for key, inner in value.items():
            yield from _leaf_paths(inner, (*prefix, key))
    else:
        yield prefix


@dataclass(frozen=True)
class GapBounds:
    """What a low-precision run must meet against exact arithmetic (:class:`LowPrecisionGaps`),
    separately on the prefill positions and the decode steps: the median gap (the typical
    rounding error), the 90th percentile (at most one position in ten may sit further out,
    where a near-tie in MoE routing resolved the other way), and how often its greedy token
    is the exact argmax."""

    median: float
    p90: float
    greedy_agreement: float


#: bf16 activations against exact arithmetic. bf16 keeps 8 significant bits, so every stored
#: activation is off by up to 2^-9 relative; through the tiny models that moves logprobs by
#: 0.01-0.03 nats at the median (measured on AVX2: transformers bf16 0.018-0.020 and vLLM bf16
#: 0.021-0.031 on the Laguna checkpoint, vLLM 0.029 on LFM2 and 0.010 on Llama 4) and
#: 0.03-0.15 at the 90th percentile, the tail being MoE routing near-ties (with every expert
#: selected, vLLM's and transformers' bf16 errors are the same: median 0.015, p90 0.026).
#: Greedy agreement measured 91-98%. A model that ignores Laguna's routing correction bias
#: measures median 0.33, p90 0.65, agreement 53%.
BF16 = GapBounds(median=0.08, p90=0.4, greedy_agreement=0.8)

#: fp8 (e4m3) rounding of activations on top of bf16: the fp8 KV cache, and FP8 experts on
#: CPUs whose kernel also quantizes the expert input (AMX-FP8). e4m3 keeps 4 significant bits
#: (relative step up to 2^-4). Not measurable on AVX2, so simulated: transformers bf16 with
#: keys and values rounded to e4m3 (scale 1) before attention, scored like a vLLM run, gives
#: median 0.08 and p90 0.29 on the Laguna checkpoint (bf16 alone there: 0.02 and 0.08).
#: Bounds 3x that, as vLLM's conversion and the prefill path may differ from the simulation.
FP8 = GapBounds(median=0.25, p90=0.8, greedy_agreement=0.5)

#: int8 W8A8 linears (per-channel weights, dynamic per-token activations) against their
#: dequantized twin: 127 levels per token move a tiny model far more than bf16 does.
#: Measured on AVX2 (oneDNN), bf16 and fp32 alike: median 0.23, p90 0.42-0.52, greedy
#: agreement 63%. vLLM's AMX kernel (int8_scaled_mm_with_quant) quantizes the same way
#: (per token, symmetric, 8 bits). One mis-loaded scale vector (o_proj's permuted)
#: measures median 0.42-0.48, p90 0.85-0.90, agreement 40%.
INT8_W8A8 = GapBounds(median=0.35, p90=0.75, greedy_agreement=0.45)


@dataclass
class LowPrecisionGaps:
    """How far a low-precision vLLM run is from exact (fp32 transformers) arithmetic on the
    *same* tokens: per position, the largest |logprob difference| over vLLM's top-5.

    Transformers scores each prompt followed by vLLM's own continuation, so the two never
    part ways: where low precision resolves a near-tie differently, the comparison follows
    vLLM's path and stays a comparison of the same prediction. (Comparing two greedy runs
    instead, as vLLM's ``check_logprobs_close`` does, stops meaning anything after the first
    divergence: on a tiny model with flat distributions and MoE routing, bf16 sequences part
    ways within a few steps, and a routing flip at that step moves logprobs by more than the
    width of the top-5.)
    """

    prefill: torch.Tensor  # one gap per prompt position (vLLM's prompt_logprobs)
    decode: torch.Tensor  # one gap per generated step (the first one is the prefill's last position)
    greedy_agreement: float  # fraction of steps where vLLM's token is the exact argmax

    def describe(self) -> str:
        def q(t):
            return " ".join(f"{name} {v:.3f}" for name, v in zip(("p50", "p90", "max"), _quantiles(t, (0.5, 0.9, 1.0))))

        return f"prefill [{q(self.prefill)}], decode [{q(self.decode)}], greedy agreement {self.greedy_agreement:.0%}"

    def assert_within(self, bounds: GapBounds) -> str:
        """Assert ``bounds`` on both paths; returns :meth:`describe` for the test's report."""
        report = self.describe()
        assert len(self.decode) > 0 and len(self.prefill) > 0, "no positions scored"
        for path, gaps in (("prefill", self.prefill), ("decode", self.decode)):
            median, p90 = _quantiles(gaps, (0.5, 0.9))
            assert median <= bounds.median, f"{path}: median gap {median:.3f} > {bounds.median} ({report})"
            assert p90 <= bounds.p90, f"{path}: 90th-percentile gap {p90:.3f} > {bounds.p90} ({report})"
        assert self.greedy_agreement >= bounds.greedy_agreement, (
            f"greedy tokens match the exact argmax at {self.greedy_agreement:.0%} of steps "
            f"< {bounds.greedy_agreement:.0%} ({report})"
        )
        return report


def _quantiles(t: torch.Tensor, qs) -> list[float]:
    return torch.quantile(t, torch.tensor(qs, dtype=t.dtype)).tolist()


def low_precision_gaps(
    model_dir: str | Path, prompts: Sequence[Sequence[int]], results: Sequence[Greedy]
) -> LowPrecisionGaps:
    """Score ``results`` (from :func:`vllm_run` with ``prompt_logprobs=True``) against exact arithmetic."""
    sequences = [list(p) + r.tokens for p, r in zip(prompts, results, strict=True)]
    exact = reference_logprobs(model_dir, sequences)
    prefill, decode, agree = [], [], []
    for prompt, result, rows in zip(prompts, results, exact):
        assert len(result.prompt_top5) == len(prompt) - 1, "run vLLM with prompt_logprobs=True"
        for pos, top in enumerate(result.prompt_top5):
            prefill.append(max(abs(lp - rows[pos, t].item()) for t, lp in top.items()))
        for step, (token, top) in enumerate(zip(result.tokens, result.top5)):
            row = rows[len(prompt) - 1 + step]
            decode.append(max(abs(lp - row[t].item()) for t, lp in top.items()))
            agree.append(token == int(row.argmax()))
    return LowPrecisionGaps(torch.tensor(prefill), torch.tensor(decode), sum(agree) / len(agree))
