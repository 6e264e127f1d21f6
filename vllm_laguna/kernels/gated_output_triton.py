"""Fused softplus output gate in one Triton pass: ``out = attn * softplus(gate)``.

Each program covers one token and a ``[BLOCK_H heads, BLOCK_D]`` tile of its row; masks make
any head count and head_dim work (80, 96, ... are padded to the next power of two).
A per-head gate is read and put through softplus once per head, then broadcast over the
head's lanes; a per-element gate is read tile for tile (the launcher views the row as one
"head" of ``H * D`` elements).

Rounding follows the reference step by step: softplus in fp32 (torch's threshold 20, and on
a GPU the same libdevice ``exp``/``log1p`` as torch's CUDA softplus, see :mod:`triton_math`),
rounded to the activation dtype, then the product of two activation-dtype values formed in
fp32 (exact for bf16 and fp16, whose 8- and 11-bit significands multiply into at most 22
bits) and rounded once to nearest-even, which is what torch's bf16/fp16/fp32 multiply does.
So on a GPU the output should equal the torch reference's there bit for bit. Under the
Triton interpreter two things differ: numpy's exp/log (a few fp32 ulp) and the interpreter's
fp32 -> bf16 cast, which truncates instead of rounding (Triton 3.9), so bf16 results there
may be up to two bf16 ulps off.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_laguna.kernels.triton_math import softplus

TILE = 2048  # elements per program: 16 per thread at 4 warps


@triton.jit
def _softplus_gate_kernel(
    attn_ptr,
    gate_ptr,
    out_ptr,
    heads,
    head_dim,
    attn_row_stride,
    gate_row_stride,
    out_row_stride,
    PER_HEAD: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    head_ok = h < heads
    mask = head_ok[:, None] & (d < head_dim)[None, :]
    cols = h[:, None] * head_dim + d[None, :]
    attn = tl.load(attn_ptr + row * attn_row_stride + cols, mask=mask)
    if PER_HEAD:
        gate = tl.load(gate_ptr + row * gate_row_stride + h, mask=head_ok, other=0.0)
        gate = softplus(gate.to(tl.float32)).to(attn.dtype)[:, None]
    else:
        gate = tl.load(gate_ptr + row * gate_row_stride + cols, mask=mask, other=0.0)
        gate = softplus(gate.to(tl.float32)).to(attn.dtype)
    out = attn.to(tl.float32) * gate.to(tl.float32)
    tl.store(out_ptr + row * out_row_stride + cols, out.to(attn.dtype), mask=mask)


def fused_softplus_gate(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Launches the gate kernel. ``attn`` [T, H*D], ``gate`` [T, H] or [T, H*D]; returns [T, H*D]."""
    if attn.stride(-1) != 1:
        attn = attn.contiguous()
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    tokens, width = attn.shape
    out = torch.empty((tokens, width), dtype=attn.dtype, device=attn.device)
    if tokens == 0 or width == 0:
        return out
    per_head = gate.shape[1] != width
    # A per-element gate is an elementwise product: one "head" spanning the whole row.
    heads, dim = (width // head_dim, head_dim) if per_head else (1, width)
    block_d = min(triton.next_power_of_2(dim), TILE)
    block_h = min(triton.next_power_of_2(heads), max(1, TILE // block_d))
    grid = (tokens, triton.cdiv(heads, block_h), triton.cdiv(dim, block_d))
    _softplus_gate_kernel[grid](
        attn,
        gate,
        out,
        heads,
        dim,
        attn.stride(0),
        gate.stride(0),
        out.stride(0),
        PER_HEAD=per_head,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
        enable_fp_fusion=True,
    )
    return out
