"""Triton kernels of the depthwise causal conv1d; the contract (shapes, slots, the torch
reference they must equal) is in :mod:`vllm_laguna.kernels.causal_conv1d`.

Parallelisation: the prefill output is computed by (token block x channel block) programs,
each tap gathering its input from ``x`` or from the request's state slot, so no program
walks a sequence; the prefill state write and the decode update are (request x channel
block) programs. Accumulation is in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _prefill_out_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, out_ptr,
    token_req_ptr, qsl_ptr, slot_ptr, init_ptr,
    num_tokens, dim,
    stride_xt, stride_wd, stride_wk, stride_ss, stride_sd, stride_sc, stride_ot,
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_T tokens x BLOCK_D channels; each tap gathers from x or the slot."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t_ok = t < num_tokens
    d_ok = d < dim
    req = tl.load(token_req_ptr + t, mask=t_ok, other=0)
    pos = t - tl.load(qsl_ptr + req, mask=t_ok, other=0)
    slot = tl.load(slot_ptr + req, mask=t_ok, other=-1).to(tl.int64)
    has_state = (tl.load(init_ptr + req, mask=t_ok, other=0) != 0) & (slot >= 0)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(KERNEL):
        back = pos - (KERNEL - 1) + k
        in_x = (back >= 0) & t_ok
        xv = tl.load(
            x_ptr + (t - (KERNEL - 1) + k)[:, None].to(tl.int64) * stride_xt + d[None, :],
            mask=in_x[:, None] & d_ok[None, :],
            other=0.0,
        )
        in_state = (back < 0) & has_state & t_ok
        sv = tl.load(
            state_ptr + slot[:, None] * stride_ss + d[None, :] * stride_sd + (pos + k)[:, None] * stride_sc,
            mask=in_state[:, None] & d_ok[None, :],
            other=0.0,
        )
        w = tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
        acc += (xv.to(tl.float32) + sv.to(tl.float32)) * w[None, :]
    out_ptrs = out_ptr + t[:, None].to(tl.int64) * stride_ot + d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _prefill_state_kernel(
    x_ptr, state_ptr, qsl_ptr, slot_ptr, init_ptr,
    dim,
    stride_xt, stride_ss, stride_sd, stride_sc,
    STATE_LEN: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: one request x BLOCK_D channels. Writes column j <- input n - S + j.

    Columns are written in ascending order and column j reads either x or the old column
    n + j > j, which no earlier iteration has overwritten, so the update is in place (each
    channel's columns are read and written by one thread: launched with one warp, so no
    element is replicated across warps).
    """
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    start = tl.load(qsl_ptr + r)
    n = tl.load(qsl_ptr + r + 1) - start
    # per-request scalars broadcast to vectors (the interpreter wants vector masks)
    zeros = tl.zeros((BLOCK_D,), dtype=tl.int64)
    slot = zeros + tl.load(slot_ptr + r).to(tl.int64)
    write = d_ok & (slot >= 0)
    read_state = write & ((zeros + tl.load(init_ptr + r)) != 0)
    base = state_ptr + slot * stride_ss + d * stride_sd
    for j in tl.static_range(STATE_LEN):
        back = zeros + n - STATE_LEN + j
        xv = tl.load(x_ptr + (start + back) * stride_xt + d, mask=write & (back >= 0), other=0.0)
        sv = tl.load(base + (n + j) * stride_sc, mask=read_state & (back < 0), other=0.0)
        v = xv.to(tl.float32) + sv.to(tl.float32)  # one of the two is zero
        tl.store(base + j * stride_sc, v.to(state_ptr.dtype.element_ty), mask=write)


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, out_ptr, slot_ptr,
    dim,
    stride_xt, stride_wd, stride_wk, stride_ss, stride_sd, stride_sc, stride_ot,
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: one request x BLOCK_D channels; shifts the slot left by one in place
    (column k is read before column k - 1 is overwritten with it; one warp, as above)."""
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    slot = tl.load(slot_ptr + r).to(tl.int64)
    has_slot = (tl.zeros((BLOCK_D,), dtype=tl.int64) + slot) >= 0  # a vector: masks must be
    base = state_ptr + slot * stride_ss + d * stride_sd
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + d, mask=d_ok, other=0.0).to(tl.float32)
    for k in tl.static_range(KERNEL - 1):
        s = tl.load(base + k * stride_sc, mask=d_ok & has_slot, other=0.0)
        acc += s.to(tl.float32) * tl.load(w_ptr + d * stride_wd + k * stride_wk, mask=d_ok, other=0.0).to(tl.float32)
        if k > 0:
            tl.store(base + (k - 1) * stride_sc, s, mask=d_ok & has_slot)
    xv = tl.load(x_ptr + r.to(tl.int64) * stride_xt + d, mask=d_ok, other=0.0)
    w_last = tl.load(w_ptr + d * stride_wd + (KERNEL - 1) * stride_wk, mask=d_ok, other=0.0)
    acc += xv.to(tl.float32) * w_last.to(tl.float32)
    tl.store(base + (KERNEL - 2) * stride_sc, xv.to(state_ptr.dtype.element_ty), mask=d_ok & has_slot)
    tl.store(out_ptr + r.to(tl.int64) * stride_ot + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)


_BLOCK_T = 16
_BLOCK_D = 64


def causal_conv1d_prefill_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of :func:`~vllm_laguna.kernels.causal_conv1d.causal_conv1d_prefill_torch`
    (same arguments and effects)."""
    assert x.stride(1) == 1, "x must be contiguous along channels"
    num_tokens, dim = x.shape
    num_reqs = state_indices.shape[0]
    query_start_loc, state_indices = query_start_loc.contiguous(), state_indices.contiguous()
    out = torch.empty_like(x)
    if num_tokens == 0 or num_reqs == 0:
        return out
    lens = query_start_loc[1 : num_reqs + 1] - query_start_loc[:num_reqs]
    token_req = torch.repeat_interleave(
        torch.arange(num_reqs, device=x.device, dtype=torch.int32), lens, output_size=num_tokens
    )
    init = has_initial_state.to(torch.int8)
    kernel = weight.shape[1]
    bias_arg = bias if bias is not None else weight
    _prefill_out_kernel[(triton.cdiv(num_tokens, _BLOCK_T), triton.cdiv(dim, _BLOCK_D))](
        x, weight, bias_arg, conv_state, out,
        token_req, query_start_loc, state_indices, init,
        num_tokens, dim,
        x.stride(0), weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        KERNEL=kernel, HAS_BIAS=bias is not None, BLOCK_T=_BLOCK_T, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    # the state is rewritten only after every output has read the old one (stream order)
    _prefill_state_kernel[(num_reqs, triton.cdiv(dim, _BLOCK_D))](
        x, conv_state, query_start_loc, state_indices, init,
        dim,
        x.stride(0), conv_state.stride(0), conv_state.stride(1), conv_state.stride(2),
        STATE_LEN=kernel - 1, BLOCK_D=_BLOCK_D, num_warps=1,
    )  # fmt: skip
    return out


def causal_conv1d_decode_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of :func:`~vllm_laguna.kernels.causal_conv1d.causal_conv1d_decode_torch`
    (same arguments and effects)."""
    assert x.stride(1) == 1, "x must be contiguous along channels"
    state_indices = state_indices.contiguous()
    num_reqs, dim = x.shape
    out = torch.empty_like(x)
    if num_reqs == 0:
        return out
    bias_arg = bias if bias is not None else weight
    _decode_kernel[(num_reqs, triton.cdiv(dim, _BLOCK_D))](
        x, weight, bias_arg, conv_state, out, state_indices,
        dim,
        x.stride(0), weight.stride(0), weight.stride(1),
        conv_state.stride(0), conv_state.stride(1), conv_state.stride(2), out.stride(0),
        KERNEL=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_D=_BLOCK_D, num_warps=1,
    )  # fmt: skip
    return out
