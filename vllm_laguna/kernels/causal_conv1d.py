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
plain-torch reference here and a Triton kernel in
:mod:`vllm_laguna.kernels.causal_conv1d_triton`. Dispatch (:mod:`vllm_laguna.kernels.dispatch`): Triton when
``x`` is on CUDA, torch otherwise and whenever ``VLLM_LAGUNA_TORCH_KERNELS=1``. The Triton kernels also run
on CPU tensors under ``TRITON_INTERPRET=1`` (set before triton is imported), which is how
they are tested without a GPU.
"""

from __future__ import annotations

import torch

from vllm_laguna.kernels.dispatch import use_triton

# ---------------------------------------------------------------------------------------
# torch references (vectorised: no Python loop over requests; the masked state write
# synchronises on CUDA, so on GPU they are for eager runs and checking, not CUDA graphs)
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
    num_tokens, channels = x.shape
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
    xf = x.float()
    weights = weight.float()

    # Tap k of token t reads input t - S + k. Every token first takes its taps from the tokens
    # before it (shifted views, S zero rows in front): right for all but each request's first
    # S tokens, whose early taps reach into the request's state; those few (R * S at most) are
    # redone below. Per token the products and sums come in the same order either way.
    padded = torch.cat([xf.new_zeros(state_len, channels), xf])
    acc = torch.zeros_like(xf) if bias is None else bias.float().expand_as(xf).clone()
    for k in range(kernel):
        acc += padded[k : k + num_tokens] * weights[:, k]

    col = torch.arange(state_len, device=x.device)
    in_request = col < lens[:, None]  # [R, S]: the request has a new token at that position
    head_pos = col.expand(num_reqs, -1)[in_request]  # [H] position within the request
    head_req = torch.arange(num_reqs, device=x.device)[:, None].expand(-1, state_len)[in_request]
    head = starts[head_req] + head_pos  # [H] token index
    fixed = acc.new_zeros(len(head), channels) if bias is None else bias.float().expand(len(head), -1).clone()
    for k in range(kernel):
        back = head_pos - state_len + k
        from_x = xf[(head - state_len + k).clamp(min=0)]
        from_state = state[head_req, :, (head_pos + k).clamp(max=state_len - 1)]
        fixed += torch.where((back >= 0)[:, None], from_x, from_state) * weights[:, k]
    acc[head] = fixed

    # new state: the last S inputs of [old state ; new tokens]
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
# dispatch (kernels.dispatch.use_triton; Triton is imported only when it is chosen: CPU
# installs of vLLM need not have it)
# ---------------------------------------------------------------------------------------


def causal_conv1d_prefill(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    query_start_loc: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    if use_triton(x):
        from vllm_laguna.kernels.causal_conv1d_triton import causal_conv1d_prefill_triton as impl
    else:
        impl = causal_conv1d_prefill_torch
    return impl(x, weight, bias, conv_state, query_start_loc, state_indices, has_initial_state)


def causal_conv1d_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    conv_state: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    if use_triton(x):
        from vllm_laguna.kernels.causal_conv1d_triton import causal_conv1d_decode_triton as impl
    else:
        impl = causal_conv1d_decode_torch
    return impl(x, weight, bias, conv_state, state_indices)
