"""Laguna with quantized routed experts on vLLM's CPU backend.

What runs there (``model_executor/cpu_support.py`` and ``layers/cpu_experts.py`` have the
sources' reasons), through modular expert classes that take the ids and weights our
``LagunaTopKRouter`` computes (the router reports the routing label each class accepts):

* FP8 experts with 128x128 block scales, AMX only: ``CPUExpertsFp8`` (weights dequantized
  block by block to bf16 inside the kernel; ``CPUExpertsFp8W8A8`` on CPUs with AMX-FP8 also
  quantizes the activations to FP8);
* int8 W8A8 experts (channel weights, dynamic per-token int8 activations): vLLM's
  ``CPUExpertsInt8`` on AMX in bf16, our ``FusedInt8Experts`` (the same kernel) on
  AVX-512-BF16 without AMX, our ``OneDnnInt8Experts`` on AVX2 and in fp32;
* int4 W4A16 experts (compressed-tensors pack-quantized, symmetric, group size 128 here):
  ``CPUExpertsInt4`` on AVX-512-BF16 and AMX, which also quantizes the activations to int8
  per token (``fused_experts_cpu`` with ``INT4_W4A8``); refused elsewhere.

The int8 and int4 checkpoints are written by compressed-tensors' compressors
(``vllm_laguna.tiny.quantize``). Where a scheme cannot run it is refused at load, saying what
to use.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import avx512_emulation

from harness import BF16, FP8, INT8_W8A8, low_precision_gaps, load_error, prompts_for, vllm_run
from quantized_checkpoints import (
    awq_pack_in_sequence,
    fp8_block_experts,
    reverse_scale_groups,
    roll_expert_scales,
    vary_expert_blocks,
)
from vllm_laguna.cpu_kind import CpuKind, detect, missing
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.quantize import quantize_checkpoint

FP8_EXPERTS = "FP8 routed experts (128x128 blocks, bf16 activations)"
INT4_EXPERTS = "int4 W4A16 routed experts (bf16 activations)"
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


def _expected_kernel(scheme: str, dtype: str = "bfloat16") -> str:
    """The experts class a run picks on this CPU (``layers/cpu_experts.py``): vLLM's own on
    AMX in bf16; without AMX but with AVX512-BF16 (vLLM's ``_C`` build), ``FusedInt8Experts``
    (int8) and vLLM's ``CPUExpertsInt4`` picked by us; otherwise (AVX2, fp32) our oneDNN experts."""
    kind = detect()
    if dtype == "bfloat16" and (kind.amx or scheme == "int4"):
        return INT_SCHEMES[scheme][0]
    if dtype == "bfloat16" and kind.avx512_bf16:
        return "FusedInt8Experts"
    return "OneDnnInt8Experts"


@pytest.mark.parametrize("scheme", sorted(INT_SCHEMES))
def test_int_experts_close_to_twin(int_checkpoints, scheme):
    """int8/int4 experts load into vLLM's own AMX class (int8 without AMX: our oneDNN experts),
    routed by our router, and stay within ``INT_EXPERTS_BOUNDS`` of exact arithmetic on the twin."""
    if scheme == "int4" and (reason := missing(INT4_EXPERTS)):
        pytest.skip(reason)
    quantized, twin, _ = int_checkpoints[scheme]
    gaps, seen = _int_gaps(quantized, twin)
    assert seen["kernel"] == _expected_kernel(scheme) and seen["router"] == "LagunaTopKRouter", seen
    print(scheme, seen, gaps.assert_within(INT_EXPERTS_BOUNDS))


@pytest.mark.parametrize("scheme", sorted(INT_SCHEMES))
def test_int_experts_planted_scale_bug_fails_the_bounds(int_checkpoints, scheme):
    """The closeness test has teeth: the planted scale bug (``INT_SCHEMES``) breaks
    ``INT_EXPERTS_BOUNDS`` against the correct twin."""
    if scheme == "int4" and (reason := missing(INT4_EXPERTS)):
        pytest.skip(reason)
    _, twin, planted = int_checkpoints[scheme]
    gaps, _ = _int_gaps(planted, twin)
    with pytest.raises(AssertionError):
        gaps.assert_within(INT_EXPERTS_BOUNDS)
    print(scheme, "planted:", gaps.describe())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_experts_on_onednn_close_to_twin(int_checkpoints, dtype, monkeypatch):
    """The AVX2 int8 path (``OneDnnInt8Experts``: oneDNN int8 GEMMs over the experts a batch
    touches), forced with ``VLLM_LAGUNA_CPU_INT8_EXPERTS=onednn`` so it runs on every x86 kind
    (bf16 in vLLM's compiled mode, which traces the MoE runner: the experts' loop is an opaque
    op), stays within ``INT_EXPERTS_BOUNDS`` of the twin in fp32 and bf16; its planted scale bug does
    not. Measured on AMX (Sapphire Rapids class, 2 cores): fp32 prefill median 0.018 / p90
    0.034, decode 0.020 / 0.041, agreement 95%; bf16 0.033 / 0.101, 0.036 / 0.130, 94%;
    planted median 1.24-1.37, agreement 8-11%."""
    monkeypatch.setenv("VLLM_LAGUNA_CPU_INT8_EXPERTS", "onednn")
    quantized, twin, planted = int_checkpoints["int8"]
    bounds = INT_EXPERTS_BOUNDS
    results, seen = vllm_run(
        quantized,
        PROMPTS,
        max_new_tokens=24,
        dtype=dtype,
        inspect=_describe_experts,
        prompt_logprobs=True,
        enforce_eager=dtype == "float32",  # bf16 in vLLM's compiled mode, its default
    )
    assert seen["kernel"] == "OneDnnInt8Experts" and seen["router"] == "LagunaTopKRouter", seen
    print(dtype, seen, low_precision_gaps(twin, PROMPTS, results).assert_within(bounds))
    results, _ = vllm_run(planted, PROMPTS, max_new_tokens=24, dtype=dtype, prompt_logprobs=True)
    gaps = low_precision_gaps(twin, PROMPTS, results)
    with pytest.raises(AssertionError):
        gaps.assert_within(bounds)
    print(dtype, "planted:", gaps.describe())


def test_int_experts_on_avx512_bf16_without_amx(wide_base, int_checkpoints, tmp_path):
    """AVX-512-BF16 without AMX (Zen 4), emulated on an AMX CPU (``avx512_emulation``: oneDNN
    capped at AVX512_CORE_BF16, vLLM and Inductor told there is no AMX, and the process never
    permitted AMX instructions, so any would kill it): int8 runs on ``FusedInt8Experts`` and
    int4 on vLLM's ``CPUExpertsInt4``, both ``fused_experts_cpu`` with vLLM's own weight
    packing, within the bf16 bounds of the twin; int4 on every linear too (``cpu_gemm_wna16``
    on its non-AMX path), as compressed-tensors, AWQ and GPTQ checkpoints, within the int8
    linears' bounds. On a real Zen 4 the tests above run natively."""
    kind = detect()
    if not kind.amx:
        pytest.skip(f"emulates a CPU without AMX on one with AMX; this CPU is {kind.name}")
    runs = [f"{scheme}={int_checkpoints[scheme][0]}={int_checkpoints[scheme][1]}=BF16" for scheme in ("int8", "int4")]
    for scheme, group_size in (("int4", 16), ("int4-awq", 32), ("int4-gptq", 32)):
        every_linear = quantize_checkpoint(
            wide_base, tmp_path / scheme, tmp_path / f"{scheme}-twin", scheme=scheme, group_size=group_size, linears=True
        )
        runs.append("{}+linears={}={}=INT8_W8A8".format(scheme, *every_linear))
    out = tmp_path / "report.json"
    script = Path(__file__).with_name("avx512_emulation.py")
    env = avx512_emulation.emulation_env(dict(os.environ))
    done = subprocess.run(
        [sys.executable, str(script), str(out), *runs], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(out.read_text())
    print(report)
    assert report["amx_permitted"] is False, "something asked for AMX: the run does not show a CPU without it"
    assert report["int8"]["kernel"] == "FusedInt8Experts" and report["int4"]["kernel"] == "CPUExpertsInt4", report
    assert report["int8"]["outside"] is None and report["int4"]["outside"] is None, report
    for scheme in ("int4+linears", "int4-awq+linears", "int4-gptq+linears"):
        assert report[scheme]["kernel"] == "CPUExpertsInt4" and report[scheme]["outside"] is None, report


def test_int8_linears_and_experts_close_to_twin(wide_base, tmp_path):
    """int8 W8A8 on every linear and the routed experts (``linears=True``): vLLM's int8 linear
    kernel (AMX's or oneDNN's) and the int8 experts of this CPU in one model, within the int8
    linears' bounds (``harness.INT8_W8A8``; measured on AMX: median 0.055, p90 0.17-0.20,
    agreement 90%)."""
    quantized, twin = quantize_checkpoint(wide_base, tmp_path / "int8", tmp_path / "twin", scheme="int8", linears=True)
    gaps, seen = _int_gaps(quantized, twin)
    assert seen["kernel"] == _expected_kernel("int8") and seen["linear"] == "CompressedTensorsW8A8Int8", seen
    print(seen, gaps.assert_within(INT8_W8A8))


def test_int4_linears_and_experts_close_to_twin(wide_base, tmp_path):
    """int4 W4A16 (group 16: the dense MLP is 96 wide) on the routed experts and every linear but the router, the LM
    head and the per-head gate (``LINEARS_IGNORE``): vLLM's CPU int4 linear kernel
    (``cpu_gemm_wna16``) and ``CPUExpertsInt4`` in one model, within the int8 linears' bounds
    (``harness.INT8_W8A8``: the int4 weights' own rounding is in the twin, but the kernels
    quantize activations to int8). Measured on AMX (Sapphire Rapids class): prefill median
    0.045 / p90 0.169, decode 0.051 / 0.148, agreement 87%; emulated AVX-512-BF16 without AMX
    (``cpu_gemm_wna16``'s vector path): 0.029 / 0.089, 0.032 / 0.086, 92%."""
    if reason := missing(INT4_EXPERTS):
        pytest.skip(reason)
    quantized, twin = quantize_checkpoint(
        wide_base, tmp_path / "int4", tmp_path / "twin", scheme="int4", group_size=16, linears=True
    )
    gaps, seen = _int_gaps(quantized, twin)
    assert seen["kernel"] == "CPUExpertsInt4" and seen["linear"] == "CompressedTensorsWNA16", seen
    print(seen, gaps.assert_within(INT8_W8A8))


#: AutoAWQ / GPTQ checkpoints (every linear int4 but the router, LM head and per-head gate;
#: groups of 32: the dense MLP is 96 wide) -> (vLLM's MoE method, planted bug)
AWQ_GPTQ = {"int4-awq": ("AutoAWQMoEMethod", awq_pack_in_sequence), "int4-gptq": ("AutoGPTQMoEMethod", roll_expert_scales)}


@pytest.mark.parametrize("scheme", sorted(AWQ_GPTQ))
def test_awq_and_gptq_checkpoints_close_to_twin(wide_base, tmp_path, scheme):
    """AWQ (asymmetric, AutoAWQ's packing) and GPTQ (symmetric, no act-order) checkpoints load
    into vLLM's own AWQ/GPTQ MoE methods and CPU kernels (``CPUExpertsInt4``; the linears on
    ``cpu_gemm_wna16``) with Laguna's router, within the int8 linears' bounds of the twin
    (``harness.INT8_W8A8``: the kernels quantize activations to int8); the planted bug (AWQ
    words packed in plain order, GPTQ scales of the next expert) does not stay within them.
    Measured on AMX: AWQ median 0.051-0.055, p90 0.15-0.20, agreement 84%; GPTQ 0.052-0.059,
    0.14-0.19, 85%; planted: AWQ median 1.53, GPTQ 1.35-1.40, agreement 3-5%."""
    if reason := missing(INT4_EXPERTS):
        pytest.skip(reason)
    method, plant = AWQ_GPTQ[scheme]
    quantized, twin = quantize_checkpoint(wide_base, tmp_path / scheme, tmp_path / "twin", scheme=scheme, group_size=32)
    results, seen = vllm_run(
        quantized, PROMPTS, max_new_tokens=24, dtype="bfloat16", inspect=_describe_experts, prompt_logprobs=True
    )
    assert seen["method"] == method and seen["kernel"] == "CPUExpertsInt4", seen
    print(scheme, seen, low_precision_gaps(twin, PROMPTS, results).assert_within(INT8_W8A8))
    plant(quantized)
    results, _ = vllm_run(quantized, PROMPTS, max_new_tokens=24, dtype="bfloat16", prompt_logprobs=True)
    gaps = low_precision_gaps(twin, PROMPTS, results)
    with pytest.raises(AssertionError):
        gaps.assert_within(INT8_W8A8)
    print(scheme, "planted:", gaps.describe())


def test_int8_experts_in_fp32_run_on_onednn(int_checkpoints):
    """vLLM's AMX int8 MoE kernel computes in bf16/fp16 only; in fp32 our oneDNN experts take
    the layer on every CPU kind (closeness: test_int8_experts_on_onednn_close_to_twin)."""
    _, seen = vllm_run(int_checkpoints["int8"][0], PROMPTS[:2], max_new_tokens=2, inspect=_describe_experts)
    assert seen["kernel"] == "OneDnnInt8Experts", seen


def test_int4_experts_refused_without_avx512_bf16(int_checkpoints):
    """Without AVX512-BF16 vLLM loads a build without ``fused_experts_cpu``: int4 experts are
    refused at load, naming the missing kernels and int8, which runs."""
    kind = detect()
    if kind.avx512_bf16:
        pytest.skip(f"this CPU ({kind.name}) has AVX512-BF16, so int4 experts run: test_int_experts_close_to_twin")
    message = load_error(int_checkpoints["int4"][0])
    assert "UnsupportedOnCpu" in message and "ignore" in message and "fused_experts_cpu" in message, message
    assert "int8 W8A8" in message, message


@pytest.mark.parametrize(
    "scheme, kind",
    [
        ("int4", CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False)),
        ("int4", CpuKind(avx2=True, avx512=True, avx512_bf16=False, amx=False)),
    ],
    ids=["int4-AVX2", "int4-AVX-512-without-BF16"],
)
def test_int_experts_refusal_reaches_the_user_on_a_made_up_cpu(int_checkpoints, scheme, kind, monkeypatch):
    """On any CPU: the engine (in this process) built with a made-up CPU kind without AMX stops
    at model construction with the refusal ``cpu_support`` words for that kind."""
    monkeypatch.setattr("vllm_laguna.model_executor.cpu_support.detect", lambda: kind)
    message = load_error(int_checkpoints[scheme][0])
    assert "UnsupportedOnCpu" in message and kind.name in message and "fused_experts_cpu" in message, message
