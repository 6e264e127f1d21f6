"""Laguna with quantized routed experts on vLLM's CPU backend.

What vLLM 0.32 runs there (``model_executor/cpu_support.py`` has the sources' reasons), on AMX
and in bf16, through its own modular expert classes, which take the ids and weights our
``LagunaTopKRouter`` computes (the router reports the routing label each class accepts):

* FP8 experts with 128x128 block scales: ``CPUExpertsFp8`` (weights dequantized block by
  block to bf16 inside the kernel; ``CPUExpertsFp8W8A8`` on CPUs with AMX-FP8 also quantizes
  the activations to FP8);
* int8 W8A8 experts (channel weights, dynamic per-token int8 activations): ``CPUExpertsInt8``;
* int4 W4A16 experts (compressed-tensors pack-quantized, symmetric, group size 128 here):
  ``CPUExpertsInt4``, which also quantizes the activations to int8 per token
  (``fused_experts_cpu`` with ``INT4_W4A8``).

The int8 and int4 checkpoints are written by compressed-tensors' compressors
(``vllm_laguna.tiny.quantize``). Without AMX each is refused at load, saying what to use.
"""

from __future__ import annotations

import shutil

import pytest

from harness import BF16, FP8, INT8_W8A8, low_precision_gaps, load_error, prompts_for, vllm_run
from quantized_checkpoints import fp8_block_experts, reverse_scale_groups, roll_expert_scales, vary_expert_blocks
from vllm_laguna.cpu_kind import CpuKind, detect, missing
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.quantize import quantize_checkpoint

FP8_EXPERTS = "FP8 routed experts (128x128 blocks, bf16 activations)"
INT_EXPERTS = "int8 W8A8 and int4 W4A16 routed experts (bf16 activations)"
PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=5)


@pytest.fixture(scope="module")
def wide_base(tmp_path_factory):
    """Experts 256 wide on a 256 hidden size: two 128-blocks along both dimensions of every
    expert weight, each block at its own magnitude (``vary_expert_blocks``), so a scale applied
    to the wrong block, group or expert moves logprobs by nats (measured with the FP8 row
    blocks' scales swapped: median 1.4). Weights std 0.04 (0.08 x sqrt(64 / 256): the default
    model's activation scale at 4x the width), top-4 of 8 experts and routed scaling 1: with the
    default top-2 and scaling 2.5 this wider model's bf16 runs are chaotic enough to exceed the
    bf16 bounds (measured p90 0.29-0.75); as built, vLLM bf16 on the FP8 twin measures median
    0.020-0.026, p90 0.054-0.080, agreement 94%."""
    base = build_laguna(
        tmp_path_factory.mktemp("wide") / "base",
        hidden_size=256,
        moe_intermediate_size=256,
        weight_std=0.04,
        top_k=4,
        routed_scaling_factor=1.0,
        seed=4,
    )
    vary_expert_blocks(base)
    return base


@pytest.fixture(scope="module")
def fp8_checkpoints(wide_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8-experts")
    fp8_block_experts(wide_base, root / "fp8", root / "twin")
    return root / "fp8", root / "twin"


def _describe_experts(model):
    experts = model.model.layers[1].mlp.experts
    method = experts.routed_experts.quant_method
    return {
        "method": type(method).__name__,
        "kernel": getattr(getattr(method, "experts_cls", None), "__name__", None),
        "router": type(experts.router).__name__,
        "linear": type(getattr(model.model.layers[1].self_attn.o_proj, "scheme", None)).__name__,
    }


def test_fp8_block_experts_close_to_twin(fp8_checkpoints):
    """The FP8 experts load into vLLM's AMX FP8 MoE kernel, routed by our router, and the
    model stays as close to exact arithmetic on its dequantized twin as a bf16 model does
    (``harness.BF16``: the W8A16 kernel computes in bf16 from the same weights), or within the
    FP8-activation bounds (``harness.FP8``) where the kernel also quantizes activations."""
    reason = missing(FP8_EXPERTS)
    if reason:
        pytest.skip(reason)
    fp8, twin = fp8_checkpoints
    results, seen = vllm_run(
        fp8, PROMPTS, max_new_tokens=24, dtype="bfloat16", inspect=_describe_experts, prompt_logprobs=True
    )
    assert seen["method"] == "CompressedTensorsW8A8Fp8MoEMethod" and seen["router"] == "LagunaTopKRouter", seen
    assert seen["kernel"] in ("CPUExpertsFp8", "CPUExpertsFp8W8A8"), seen
    bounds = BF16 if seen["kernel"] == "CPUExpertsFp8" else FP8
    print(seen, low_precision_gaps(twin, PROMPTS, results).assert_within(bounds))


def test_fp8_block_experts_in_fp32_refused_on_amx(fp8_checkpoints):
    """The AMX FP8 MoE kernel computes in bf16/fp16: fp32 fails at load, naming the dtype to use."""
    reason = missing(FP8_EXPERTS)
    if reason:
        pytest.skip(reason)
    message = load_error(fp8_checkpoints[0], dtype="float32")
    assert "UnsupportedOnCpu" in message and "use dtype='bfloat16'" in message, message


def test_fp8_block_experts_refused_without_amx(fp8_checkpoints):
    if detect().amx:
        pytest.skip("this CPU has AMX, so the FP8 experts run: test_fp8_block_experts_close_to_twin")
    message = load_error(fp8_checkpoints[0])
    assert "UnsupportedOnCpu" in message and "need AMX" in message and "ignore" in message, message


#: int8 and int4 experts against exact arithmetic on their dequantized twin, bf16 run: the bf16
#: bounds (``harness.BF16``). Both kernels also quantize the expert input to int8 per token
#: (127 levels), but on the experts alone that adds little to bf16's rounding: measured on
#: AMX (Sapphire Rapids class, 2 cores), int8 prefill median 0.031 / p90 0.086, decode 0.037 /
#: 0.134, greedy agreement 93%; int4 (group 128) prefill 0.029 / 0.064, decode 0.034 / 0.097,
#: 93% (bf16 alone on the FP8 tests' twin of the same model: median 0.020-0.026, p90
#: 0.054-0.080, 94%). The planted bugs measure median 1.25-1.50, p90 1.78-2.06, agreement 5-10%.
#: Smaller bugs, measured once: one pair of experts' down_proj scales swapped in one layer
#: (int8) gives median 0.10, caught; one down_proj's two groups swapped in one layer (int4)
#: gives median 0.05, p90 0.23-0.26, agreement 86%, inside these bounds.
INT_EXPERTS_BOUNDS = BF16

#: scheme -> (vLLM's expert class, planted bug)
INT_SCHEMES = {
    "int8": ("CPUExpertsInt8", roll_expert_scales),
    "int4": ("CPUExpertsInt4", reverse_scale_groups),
}


@pytest.fixture(scope="module")
def int_checkpoints(wide_base, tmp_path_factory):
    """:func:`wide_base` (channel scales differ between experts, group scales between the two
    128-groups of a row) quantized by compressed-tensors as int8 W8A8 and as int4 W4A16 with
    group size 128, each with its twin and with its planted bug (``INT_SCHEMES``: int8 scales
    rolled to the next expert, int4 group scales in reverse order).
    ``{scheme: (quantized, twin, planted)}``."""
    root = tmp_path_factory.mktemp("int-experts")
    made = {}
    for scheme, (_, plant) in INT_SCHEMES.items():
        quantized, twin = quantize_checkpoint(wide_base, root / scheme, root / f"{scheme}-twin", scheme=scheme)
        planted = root / f"{scheme}-planted"
        shutil.copytree(quantized, planted)
        plant(planted)
        made[scheme] = (quantized, twin, planted)
    return made


def _int_gaps(quantized, twin):
    results, seen = vllm_run(
        quantized, PROMPTS, max_new_tokens=24, dtype="bfloat16", inspect=_describe_experts, prompt_logprobs=True
    )
    return low_precision_gaps(twin, PROMPTS, results), seen


@pytest.mark.parametrize("scheme", sorted(INT_SCHEMES))
def test_int_experts_close_to_twin(int_checkpoints, scheme):
    """int8/int4 experts load into vLLM's own AMX class, routed by our router, and stay within
    ``INT_EXPERTS_BOUNDS`` of exact arithmetic on the twin."""
    reason = missing(INT_EXPERTS)
    if reason:
        pytest.skip(reason)
    quantized, twin, _ = int_checkpoints[scheme]
    gaps, seen = _int_gaps(quantized, twin)
    assert seen["kernel"] == INT_SCHEMES[scheme][0] and seen["router"] == "LagunaTopKRouter", seen
    print(scheme, seen, gaps.assert_within(INT_EXPERTS_BOUNDS))


@pytest.mark.parametrize("scheme", sorted(INT_SCHEMES))
def test_int_experts_planted_scale_bug_fails_the_bounds(int_checkpoints, scheme):
    """The closeness test has teeth: the planted scale bug (``INT_SCHEMES``) breaks
    ``INT_EXPERTS_BOUNDS`` against the correct twin."""
    reason = missing(INT_EXPERTS)
    if reason:
        pytest.skip(reason)
    _, twin, planted = int_checkpoints[scheme]
    gaps, _ = _int_gaps(planted, twin)
    with pytest.raises(AssertionError):
        gaps.assert_within(INT_EXPERTS_BOUNDS)
    print(scheme, "planted:", gaps.describe())


def test_int8_linears_and_experts_close_to_twin(wide_base, tmp_path):
    """int8 W8A8 on every linear and the routed experts (``linears=True``): vLLM's AMX int8
    linear kernel and CPUExpertsInt8 in one model, within the int8 linears' bounds
    (``harness.INT8_W8A8``; measured on AMX: median 0.055, p90 0.17-0.20, agreement 90%)."""
    reason = missing(INT_EXPERTS)
    if reason:
        pytest.skip(reason)
    quantized, twin = quantize_checkpoint(wide_base, tmp_path / "int8", tmp_path / "twin", scheme="int8", linears=True)
    gaps, seen = _int_gaps(quantized, twin)
    assert seen["kernel"] == "CPUExpertsInt8" and seen["linear"] == "CompressedTensorsW8A8Int8", seen
    print(seen, gaps.assert_within(INT8_W8A8))


def test_int8_experts_in_fp32_refused_on_amx(int_checkpoints):
    """vLLM's AMX int8/int4 MoE kernels compute in bf16/fp16: fp32 fails at load, naming the dtype."""
    reason = missing(INT_EXPERTS)
    if reason:
        pytest.skip(reason)
    message = load_error(int_checkpoints["int8"][0], dtype="float32")
    assert "UnsupportedOnCpu" in message and "use dtype='bfloat16'" in message, message


@pytest.mark.parametrize("scheme", sorted(INT_SCHEMES))
def test_int_experts_refused_without_amx(int_checkpoints, scheme):
    """Without AMX: int4 on AVX2 names the kernels vLLM's AVX2 build lacks; int8 (and int4 on
    AVX-512 without AMX) are not implemented yet. Each says what to use instead."""
    kind = detect()
    if kind.amx:
        pytest.skip("this CPU has AMX, so int8/int4 experts run: test_int_experts_close_to_twin")
    message = load_error(int_checkpoints[scheme][0])
    assert "UnsupportedOnCpu" in message and "ignore" in message and "AMX CPU" in message, message
    if scheme == "int4" and not kind.avx512:
        assert "fused_experts_cpu" in message and "cpu_gemm_wna16" in message, message
    else:
        assert "not implemented yet" in message, message


@pytest.mark.parametrize(
    "scheme, kind",
    [
        ("int4", CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False)),
        ("int8", CpuKind(avx2=True, avx512=True, avx512_bf16=True, amx=False)),
    ],
    ids=["int4-AVX2", "int8-AVX-512"],
)
def test_int_experts_refusal_reaches_the_user_on_a_made_up_cpu(int_checkpoints, scheme, kind, monkeypatch):
    """On any CPU: the engine (in this process) built with a made-up CPU kind without AMX stops
    at model construction with the refusal ``cpu_support`` words for that kind."""
    monkeypatch.setattr("vllm_laguna.model_executor.cpu_support.detect", lambda: kind)
    message = load_error(int_checkpoints[scheme][0])
    assert "UnsupportedOnCpu" in message and kind.name in message and "AMX CPU" in message, message
    assert ("cpu_gemm_wna16" if scheme == "int4" else "not implemented yet") in message, message
