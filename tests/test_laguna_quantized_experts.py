"""Laguna with quantized routed experts on vLLM's CPU backend.

What vLLM 0.32 can run there (``model_executor/cpu_support.py`` has the sources' reasons):
FP8 experts with 128x128 block scales, on AMX, in bf16 — ``CPUExpertsFp8`` (weights
dequantized block by block to bf16 inside the kernel; ``CPUExpertsFp8W8A8`` on CPUs with
AMX-FP8 also quantizes the activations to FP8), which accepts Laguna's routing (DeepSeek-V3
style) and takes the ids and weights our ``LagunaTopKRouter`` computes. Its int8, int4 and
MXFP4 MoE kernels accept softmax routing only, so int8 experts are refused at load on every
CPU, with what to use instead.
"""

from __future__ import annotations

import pytest

from harness import BF16, FP8, low_precision_gaps, load_error, prompts_for, vllm_run
from quantized_checkpoints import fp8_block_experts, int8_experts, vary_expert_blocks
from vllm_laguna.cpu_kind import detect, missing
from vllm_laguna.tiny.laguna import build_laguna

FP8_EXPERTS = "FP8 routed experts (128x128 blocks, bf16 activations)"
PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=5)


@pytest.fixture(scope="module")
def fp8_checkpoints(tmp_path_factory):
    """Experts 256 wide on a 256 hidden size: two 128-blocks along both dimensions of every
    expert weight, each block at its own magnitude (``vary_expert_blocks``), so a scale applied
    to the wrong block or expert moves logprobs by nats (measured with the row blocks' scales
    swapped: median 1.4). Weights std 0.04 (0.08 x sqrt(64 / 256): the default model's
    activation scale at 4x the width), top-4 of 8 experts and routed scaling 1: with the
    default top-2 and scaling 2.5 this wider model's bf16 runs are chaotic enough to exceed the
    bf16 bounds (measured p90 0.29-0.75); as built, vLLM bf16 on the twin measures median
    0.020-0.026, p90 0.054-0.080, agreement 94%."""
    root = tmp_path_factory.mktemp("fp8-experts")
    base = build_laguna(
        root / "base",
        hidden_size=256,
        moe_intermediate_size=256,
        weight_std=0.04,
        top_k=4,
        routed_scaling_factor=1.0,
        seed=4,
    )
    vary_expert_blocks(base)
    fp8_block_experts(base, root / "fp8", root / "twin")
    return root / "fp8", root / "twin"


def _describe_experts(model):
    experts = model.model.layers[1].mlp.experts
    method = experts.routed_experts.quant_method
    return {
        "method": type(method).__name__,
        "kernel": getattr(getattr(method, "experts_cls", None), "__name__", None),
        "router": type(experts.router).__name__,
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


def test_int8_experts_refused_with_what_runs(tmp_path):
    """On every CPU: vLLM's CPU int8 MoE kernel accepts softmax routing only."""
    base = build_laguna(tmp_path / "base")
    int8_experts(base, tmp_path / "int8", tmp_path / "twin")
    message = load_error(tmp_path / "int8")
    assert "UnsupportedOnCpu" in message and "softmax routing" in message, message
    assert "FP8 with 128x128 blocks" in message and "ignore" in message, message
