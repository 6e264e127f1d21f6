"""The CPU bf16 linear over vLLM's fp32 oneDNN GEMM (model_executor/layers/cpu_gemm.py).

The op runs on every x86 CPU (oneDNN fp32 exists everywhere); the models switch to it only
where oneDNN has no bf16 matmul, which test_laguna_modes' bf16 run covers end to end.
"""

from __future__ import annotations

import pytest
import torch

from vllm import _custom_ops as ops

from vllm_laguna.model_executor.layers import cpu_gemm  # noqa: F401  (registers the op)

OUT, IN = 160, 96


def _fp32_product(x, w, b):
    """What the op promises: the bf16 values multiplied in fp32, rounded to bf16 once."""
    y = x.float() @ w.float().T
    return (y if b is None else y + b.float()).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_fp32_product_of_the_bf16_values(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=gen).to(torch.bfloat16)
    w = (torch.randn(OUT, IN, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(OUT, generator=gen).to(torch.bfloat16) if with_bias else None
    dnnl = ops.create_onednn_mm(w.float().t(), 8)
    out = torch.ops.vllm_laguna.bf16_linear_fp32_onednn(x, w, b, dnnl.handler_tensor, OUT)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, OUT)
    # same math, another summation order: at most one bf16 rounding step apart
    torch.testing.assert_close(out.float(), _fp32_product(x, w, b).float(), rtol=2**-7, atol=1e-5)


def test_row_count_is_not_a_compile_guard():
    """Under torch.compile with dynamic rows the op is one opaque node: one graph serves a
    single row (bf16 GEMV) and many rows (oneDNN)."""
    w = (torch.randn(OUT, IN) * 0.1).to(torch.bfloat16)
    dnnl = ops.create_onednn_mm(w.float().t(), 8)

    def linear(x):
        return torch.ops.vllm_laguna.bf16_linear_fp32_onednn(x, w, None, dnnl.handler_tensor, OUT) * 2

    compiled = torch.compile(linear, backend="eager", dynamic=True, fullgraph=True)
    for rows in (1, 7):
        x = torch.randn(rows, IN).to(torch.bfloat16)
        torch.testing.assert_close(compiled(x), linear(x), rtol=0, atol=0)
