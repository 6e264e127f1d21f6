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

#: worst gap of every assert_parity call of this session, by test (conftest prints them)
PARITY_GAPS: dict[str, float] = {}
#: what turning a feature off did to transformers' output, by test (conftest prints them)
FEATURE_EFFECTS: dict[str, float] = {}


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
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs(model_dir, dtype, **llm_kwargs))
    try:
        inspected = llm.apply_model(inspect)[0] if inspect is not None else None
        params = SamplingParams(
            temperature=0.0, max_tokens=max_new_tokens, logprobs=num_logprobs, ignore_eos=True
        )
        outputs = llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
    finally:
        shutdown(llm)
    return [Greedy.from_output(o, num_logprobs) for o in outputs], inspected


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
    with ``config_changes`` applied to the checkpoint's config and the parameters whose names
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
