"""Depthwise causal conv1d over a batch of requests, each with its own state slot.

Shapes (one tensor-parallel rank; D channels, kernel L, state length S = L - 1):

* ``x``: ``[T, D]`` token-major input, the requests' tokens back to back;
* ``weight``: ``[D, L]``, ``bias``: ``[D]`` or None;
* ``conv_state``: ``[num_slots, D, S]``, any strides (vLLM stores it ``[num_slots, S, D]``
  and hands out the transposed view); slot ``s`` holds the last S inputs a request has seen,
  oldest first;
* ``state_indices``: ``[R]`` int, the slot of each request; a negative index means "no slot":
  the request starts from zeros and its state is not written.

``out[t, d] = bias[d] + sum_k weight[d, k] * window_t[d, k]`` where ``window_t`` is the L
inputs ending at token t, reaching back into the request's state slot (or zeros for a
request that starts fresh). Accumulation is in fp32, the output in ``x``'s dtype.

Two entry points: :func:`causal_conv1d_prefill` (requests with any number of new tokens: a
whole prompt, or one chunk of it after earlier chunks left their state in the slot) and
:func:`causal_conv1d_decode` (one token per request, the slot updated in place). Each has a
plain-torch reference and a Triton kernel. Dispatch: Triton when ``x`` is on CUDA, torch
otherwise and whenever ``VLLM_LAGUNA_TORCH_KERNELS=1``. The Triton kernels also run on CPU
tensors under ``TRITON_INTERPRET=1`` (set before this module is imported), which is how
they are tested without a GPU.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------
# torch references (vectorised: no loop over requests, no host synchronisation)
# ---------------------------------------------------------------------------------------


def causal_conv1d_prefill_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Conv over R requests' new tokens; writes each request's last S inputs to its slot.

    ``query_start_loc``: ``[R + 1]`` token offsets of the requests in ``x``;
    ``has_initial_state``: ``[R]`` bool, whether the slot already holds this request's
    earlier inputs (a later chunk of a chunked prompt, or a prefix-cache hit).
    """
    num_tokens, _ = x.shape
    num_reqs = state_indices.shape[0]
    kernel = weight.shape[1]
    state_len = kernel - 1
    starts = query_start_loc[:num_reqs].long()
    lens = query_start_loc[1 : num_reqs + 1].long() - starts
    slots = state_indices.long()
    # a request whose slot holds nothing (or who has no slot) starts from zeros
    usable = has_initial_state.bool() & (slots >= 0)
    # (where, not a product: a slot never written may hold NaN garbage)
    state = conv_state[slots.clamp(min=0)].float()  # [R, D, S]
    state = torch.where(usable[:, None, None], state, torch.zeros_like(state))

    token = torch.arange(num_tokens, device=x.device)
    req = torch.repeat_interleave(torch.arange(num_reqs, device=x.device), lens, output_size=num_tokens)
    pos = token - starts[req]  # position of each token within its request's new tokens
    xf = x.float()
    acc = torch.zeros_like(xf) if bias is None else bias.float().expand_as(xf).clone()
    for k in range(kernel):
        # tap k of token t reads input t - S + k: a new token, or column pos + k of the state
        back = pos - state_len + k
        from_x = xf[(token - state_len + k).clamp(min=0)]
        from_state = state[req, :, (pos + k).clamp(max=state_len - 1)]
        acc += torch.where((back >= 0)[:, None], from_x, from_state) * weight[:, k].float()

    # new state: the last S inputs of [old state ; new tokens]
    col = torch.arange(state_len, device=x.device)
    back = lens[:, None] - state_len + col  # [R, S]
    from_x = xf[(starts[:, None] + back).clamp(min=0, max=max(num_tokens - 1, 0))]  # [R, S, D]
    from_state = state.gather(2, (lens[:, None] + col).clamp(max=state_len - 1)[:, None, :].expand_as(state))
    new_state = torch.where((back >= 0)[:, :, None], from_x, from_state.transpose(1, 2))
    written = slots >= 0
    conv_state[slots[written]] = new_state[written].transpose(1, 2).to(conv_state.dtype)
    return acc.to(x.dtype)


def causal_conv1d_decode_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One new token per request (``x``: ``[N, D]``); shifts it into the request's slot."""
    slots = state_indices.long()
    valid = slots >= 0
    state = conv_state[slots.clamp(min=0)]
    state = torch.where(valid[:, None, None], state, torch.zeros_like(state))
    window = torch.cat([state, x.unsqueeze(-1).to(state.dtype)], dim=-1)
    out = (window.float() * weight.float()).sum(-1)
    if bias is not None:
        out += bias.float()
    conv_state[slots[valid]] = window[valid, :, 1:].to(conv_state.dtype)
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------


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
    n + j > j, which no earlier iteration has overwritten, so the update is in place.
    """
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    start = tl.load(qsl_ptr + r)
    n = tl.load(qsl_ptr + r + 1) - start
    slot = tl.load(slot_ptr + r).to(tl.int64)
    if slot >= 0:
        has_state = tl.load(init_ptr + r) != 0
        base = state_ptr + slot * stride_ss + d * stride_sd
        for j in tl.static_range(STATE_LEN):
            back = n - STATE_LEN + j
            if back >= 0:
                v = tl.load(x_ptr + (start + back).to(tl.int64) * stride_xt + d, mask=d_ok, other=0.0)
            else:
                v = tl.load(base + (n + j) * stride_sc, mask=d_ok & has_state, other=0.0)
            tl.store(base + j * stride_sc, v.to(state_ptr.dtype.element_ty), mask=d_ok)


@triton.jit
def _decode_kernel(
    x_ptr, w_ptr, b_ptr, state_ptr, out_ptr, slot_ptr,
    dim,
    stride_xt, stride_wd, stride_wk, stride_ss, stride_sd, stride_sc, stride_ot,
    KERNEL: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program: one request x BLOCK_D channels; shifts the slot left by one in place."""
    r = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < dim
    slot = tl.load(slot_ptr + r).to(tl.int64)
    has_slot = slot >= 0
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
    """Triton twin of :func:`causal_conv1d_prefill_torch` (same arguments and effects)."""
    assert x.stride(1) == 1, "x must be contiguous along channels"
    num_tokens, dim = x.shape
    num_reqs = state_indices.shape[0]
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
        STATE_LEN=kernel - 1, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    return out


def causal_conv1d_decode_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """Triton twin of :func:`causal_conv1d_decode_torch` (same arguments and effects)."""
    assert x.stride(1) == 1, "x must be contiguous along channels"
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
        KERNEL=weight.shape[1], HAS_BIAS=bias is not None, BLOCK_D=_BLOCK_D,
    )  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------


def use_triton(x: torch.Tensor) -> bool:
    """Triton on CUDA tensors unless ``VLLM_LAGUNA_TORCH_KERNELS=1`` forces torch."""
    return x.is_cuda and os.environ.get("VLLM_LAGUNA_TORCH_KERNELS", "0") != "1"


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    impl = causal_conv1d_prefill_triton if use_triton(x) else causal_conv1d_prefill_torch
    return impl(x, weight, bias, conv_state, query_start_loc, state_indices, has_initial_state)


def causal_conv1d_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    impl = causal_conv1d_decode_triton if use_triton(x) else causal_conv1d_decode_torch
    return impl(x, weight, bias, conv_state, state_indices)
