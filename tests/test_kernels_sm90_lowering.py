"""The fused kernels lower to H100 (sm_90) machine code, checked on a machine without a GPU.

The interpreter tests run the kernels' logic on CPU but never compile them; this compiles the
exact launches the launchers make (captured instead of run) with triton's own compiler and
ptxas for ``cuda:90``, then checks the cubin spills nothing to local memory and that bf16
results are rounded to nearest-even (``cvt.rn.bf16.f32``), which the interpreter does not do.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import mangle_type  # noqa: E402

from vllm_laguna.kernels import dispatch  # noqa: E402

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
pytestmark = [
    pytest.mark.skipif(not os.path.exists(CUOBJDUMP), reason="triton wheel without the NVIDIA backend tools"),
    pytest.mark.skipif(dispatch.TRITON_INTERPRET, reason="compiles the GPU math, not the interpreter's"),
]
H100 = GPUTarget("cuda", 90, 32)


class _CapturedKernel:
    """Stands in for a ``@triton.jit`` kernel: records ``kernel[grid](*args, **kwargs)``."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, dict(kwargs)))


def _lower(kernel, args, kwargs, tmp_path):
    options = {name: kwargs.pop(name) for name in ("num_warps", "enable_fp_fusion")}
    signature = {name: mangle_type(arg) for name, arg in zip(kernel.arg_names, args)}
    signature.update({name: "constexpr" for name in kwargs})
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=kwargs), target=H100, options=options)
    cubin = tmp_path / "kernel.cubin"
    cubin.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
    return compiled.asm["ptx"], usage.stdout


def _captured_launch(monkeypatch, module, kernel_name, launch):
    captured = _CapturedKernel(getattr(module, kernel_name))
    monkeypatch.setattr(module, kernel_name, captured)
    launch()
    ((args, kwargs),) = captured.launches
    return captured.kernel, args, kwargs


ROUTER_CASES = {
    "laguna-256x8-fp32": (256, 8, torch.float32, torch.float32, 0.0, False, "sigmoid"),
    "laguna-256x16-bf16": (256, 16, torch.bfloat16, torch.float32, 0.0, False, "sigmoid"),
    "laguna-128x1-nobias": (128, 1, torch.float32, None, 0.0, False, "sigmoid"),
    "laguna-512x32-softcap": (512, 32, torch.float32, torch.float32, 30.0, False, "sigmoid"),
    "laguna-60x8-bf16-bias-softcap": (60, 8, torch.bfloat16, torch.bfloat16, 5.0, False, "sigmoid"),
    "laguna-256x8-bf16-sqrtsoftplus": (256, 8, torch.bfloat16, torch.float32, 0.0, False, "sqrtsoftplus"),
    "laguna-512x32-sqrtsoftplus-softcap": (512, 32, torch.float32, torch.float32, 30.0, False, "sqrtsoftplus"),
    "llama4-128x1": (128, 1, torch.bfloat16, None, 0.0, True, "sigmoid"),
}


@pytest.mark.parametrize("case", list(ROUTER_CASES))
def test_router_lowers_to_sm90_without_spills(case, monkeypatch, tmp_path):
    from vllm_laguna.kernels import sigmoid_topk_triton

    experts, top_k, dtype, bias_dtype, softcap, llama4, score_func = ROUTER_CASES[case]
    logits = torch.zeros(3, experts, dtype=dtype)
    bias = None if bias_dtype is None else torch.zeros(experts, dtype=bias_dtype)
    kernel, args, kwargs = _captured_launch(
        monkeypatch,
        sigmoid_topk_triton,
        "_route_kernel",
        lambda: sigmoid_topk_triton.fused_topk(logits, bias, top_k, softcap, 2.5, not llama4, llama4, score_func),
    )
    ptx, usage = _lower(kernel, args, kwargs, tmp_path)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    # sqrt(softplus) takes an IEEE-rounded square root (torch's CUDA sqrt), not sqrt.approx
    assert ("sqrt.rn.f32" in ptx) == (score_func == "sqrtsoftplus"), "sqrt.rn.f32 in the PTX"


GATE_CASES = {
    "xs2-per-head-bf16": (48, 128, torch.bfloat16, False),
    "m1-per-element-bf16": (64, 128, torch.bfloat16, True),
    "per-head-80-fp16": (6, 80, torch.float16, False),
    "per-element-96-fp32": (5, 96, torch.float32, True),
}


@pytest.mark.parametrize("case", list(GATE_CASES))
def test_gate_lowers_to_sm90_and_rounds_to_nearest(case, monkeypatch, tmp_path):
    from vllm_laguna.kernels import gated_output_triton

    heads, head_dim, dtype, per_element = GATE_CASES[case]
    attn = torch.zeros(3, heads * head_dim, dtype=dtype)
    gate = torch.zeros(3, heads * head_dim if per_element else heads, dtype=dtype)
    kernel, args, kwargs = _captured_launch(
        monkeypatch,
        gated_output_triton,
        "_softplus_gate_kernel",
        lambda: gated_output_triton.fused_softplus_gate(attn, gate, head_dim),
    )
    ptx, usage = _lower(kernel, args, kwargs, tmp_path)
    assert "LOCAL:0" in usage and "STACK:0" in usage, usage
    if dtype == torch.bfloat16:
        assert "cvt.rn.bf16.f32" in ptx
    if dtype == torch.float16:
        assert "cvt.rn.f16.f32" in ptx
