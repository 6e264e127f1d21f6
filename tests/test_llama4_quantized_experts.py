"""Llama 4 with int8 W8A8 routed experts on vLLM's CPU backend.

Llama 4 scales each expert's input by its router weight (sigmoid of the logit, one expert
per row: ``layers/llama4_moe.py``). vLLM's prepare step scales the rows; its CPU int8 class
refuses that at the first forward (it weights the output too), so our experts classes
(``layers/cpu_experts.py``) run the layer with unit combine weights, on every CPU kind. int4
and FP8 experts have no such path and are refused at load, naming int8.

Checkpoints: the tiny Llama 4 with per-expert tensors (the layout quantized Llama 4
checkpoints use), quantized by compressed-tensors' compressors; the dequantized twin has
its experts fused again for transformers.
"""

from __future__ import annotations

import shutil

import pytest

import re

from checkpoint_edits import rewrite_tensors
from harness import BF16, low_precision_gaps, load_error, prompts_for, vllm_run
from quantized_checkpoints import roll_expert_scales
from vllm_laguna.cpu_kind import detect
from vllm_laguna.tiny.llama4 import build_llama4
from vllm_laguna.tiny.quantize import quantize_checkpoint

PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=7)


@pytest.fixture(scope="module", params=[1, 2], ids=["top1", "top2"])
def int8_checkpoints(request, tmp_path_factory):
    """``(quantized, twin, planted)`` for Llama 4 with top-``k`` routing: top-1 (Scout,
    Maverick: vLLM's plain path) and top-2 (one row per token and choice)."""
    root = tmp_path_factory.mktemp(f"llama4-int8-top{request.param}")
    base = build_llama4(
        root / "base", expert_layout="per-expert", top_k=request.param, hidden_size=128, intermediate_size=64
    )
    amplify_expert_outputs(base)
    quantized, twin = quantize_checkpoint(base, root / "int8", root / "twin", scheme="int8")
    planted = root / "planted"
    shutil.copytree(quantized, planted)
    roll_expert_scales(planted)
    return quantized, twin, planted


def amplify_expert_outputs(ckpt) -> None:
    """Scale expert ``e``'s ``down_proj`` by 2, 4 or 8 (by ``e % 3``), so the routed experts
    dominate the residual stream and differ from one another: a router weight applied twice
    (or not at all) or a scale from the wrong expert moves the logprobs by more than bf16
    rounding does. (As built, with std-0.08 weights, the experts add little: a router weight
    applied twice measured median 0.078, inside the bf16 bounds.)"""
    pattern = re.compile(r"\.experts\.(\d+)\.down_proj\.weight$")

    def amplify(tensors):
        return {
            name: t * 2.0 ** (1 + int(m.group(1)) % 3) if (m := pattern.search(name)) else t
            for name, t in tensors.items()
        }

    rewrite_tensors(ckpt, amplify)


def _describe_experts(model):
    experts = model.model.layers[1].feed_forward.experts
    method = experts.routed_experts.quant_method
    return {"method": type(method).__name__, "kernel": getattr(method.experts_cls, "__name__", None)}


def _gaps(model, twin, compiled: bool = False):
    results, seen = vllm_run(
        model,
        PROMPTS,
        max_new_tokens=24,
        dtype="bfloat16",
        inspect=_describe_experts,
        prompt_logprobs=True,
        enforce_eager=not compiled,
    )
    return low_precision_gaps(twin, PROMPTS, results), seen


def test_int8_experts_close_to_twin(int8_checkpoints):
    """int8 experts with the router weight on their input stay within the bf16 bounds of
    exact arithmetic on the twin (transformers fp32). Measured on AMX (FusedInt8Experts):
    top-1 median 0.028-0.031, p90 0.055-0.075, agreement 92%; top-2 0.033-0.036,
    0.087-0.107, 93%; the planted bug median 1.12-1.48, agreement 14-20%; a router weight
    applied twice (a bug tried once) median 0.23-0.34."""
    quantized, twin, _ = int8_checkpoints
    gaps, seen = _gaps(quantized, twin, compiled=True)  # vLLM's default mode
    kernel = "FusedInt8Experts" if detect().avx512_bf16 else "OneDnnInt8Experts"
    assert seen == {"method": "CompressedTensorsW8A8Int8MoEMethod", "kernel": kernel}, seen
    print(seen, gaps.assert_within(BF16))


def test_int8_experts_on_onednn_close_to_twin(int8_checkpoints, monkeypatch):
    """The AVX2 path (our oneDNN experts, forced so it runs on every x86 kind) with the router
    weight on the input: within the same bounds."""
    monkeypatch.setenv("VLLM_LAGUNA_CPU_INT8_EXPERTS", "onednn")
    quantized, twin, _ = int8_checkpoints
    gaps, seen = _gaps(quantized, twin, compiled=True)
    assert seen["kernel"] == "OneDnnInt8Experts", seen
    print(seen, gaps.assert_within(BF16))


def test_int8_experts_planted_scale_bug_fails_the_bounds(int8_checkpoints):
    _, twin, planted = int8_checkpoints
    gaps, _ = _gaps(planted, twin)
    with pytest.raises(AssertionError):
        gaps.assert_within(BF16)
    print("planted:", gaps.describe())


def test_int4_experts_refused_naming_int8(tmp_path):
    """No CPU int4 MoE kernel takes the router weight on the input: refused at load, naming
    the int8 scheme that runs."""
    base = build_llama4(tmp_path / "base", expert_layout="per-expert", hidden_size=128, intermediate_size=128)
    quantized, _ = quantize_checkpoint(base, tmp_path / "int4", tmp_path / "twin", scheme="int4", group_size=64)
    message = load_error(quantized)
    assert "UnsupportedOnCpu" in message and "expert input" in message and "int8 W8A8" in message, message
