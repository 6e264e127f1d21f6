"""Fused sigmoid top-k routing in one Triton launch (Laguna and Llama 4 variants).

One program routes ``ROWS`` tokens; one warp holds each row's ``E <= 512`` logits in
registers (padded to a power of two, padding masked out) and computes in fp32:

* selection keys: ``score(softcap(logit)) + bias`` (Laguna; the score is ``sigmoid`` or
  ``sqrt(softplus)``) or the raw logit (Llama 4),
  mapped as ``torch.nan_to_num(key, nan=-inf)`` maps them in the reference (NaN ranks last,
  +-Inf tie with +-FLT_MAX) and with -0.0 folded into +0.0 (they compare equal);
* each key becomes one int64 ``(order-preserving bits of the float << 32) | (BLOCK_E - 1 -
  expert)``, so a single integer max per step yields the best key and, among equal keys,
  the lowest expert: exactly the stable descending sort of the reference. ``k`` such
  max-and-remove steps give the ids in descending order; padding and removed entries hold
  INT64_MIN, below every real key, so a row of NaN or +-Inf still yields k distinct ids;
* weights: the chosen logits are re-read (L1-resident) and mapped through the same
  ``softcap -> score`` code as the keys, so they are the very scores that were ranked;
  NaN -> 0, renormalised over the k chosen (sum > 0), times the routed scaling factor.

The fp32 math comes from :mod:`triton_math`, which rounds as torch's CUDA kernels do, so on a
GPU the keys, and hence the ids, equal the reference's computed there.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_laguna.kernels.sigmoid_topk import MAX_FUSED_EXPERTS, SCORE_FUNCS
from vllm_laguna.kernels.triton_math import mul_rn, sigmoid, softplus, tanh

FLT_MAX: tl.constexpr = tl.constexpr(3.4028234663852886e38)
INT64_MIN: tl.constexpr = tl.constexpr(-(2**63))


@triton.jit
def _score(logit, softcap, inv_softcap, HAS_SOFTCAP: tl.constexpr, SQRT_SOFTPLUS: tl.constexpr):
    """``score(tanh(logit / softcap) * softcap)``, the soft-cap only when enabled; the score
    is ``sqrt(softplus(.))`` with ``SQRT_SOFTPLUS`` (+-Inf taken as +-FLT_MAX, as the
    reference does), else ``sigmoid``.

    The division is a multiplication by ``fp32(1 / softcap)``, as torch's CUDA division by a
    Python scalar does it (``div_true_kernel_cuda``); the square root is IEEE-rounded, as
    torch's CUDA ``sqrt``.
    """
    if HAS_SOFTCAP:
        logit = mul_rn(tanh(mul_rn(logit, inv_softcap)), softcap)
    if SQRT_SOFTPLUS:
        # +-Inf as +-FLT_MAX (unbounded score: keeps weights finite); NaN stays NaN
        logit = tl.where(logit == float("inf"), FLT_MAX, tl.where(logit == float("-inf"), -FLT_MAX, logit))
        return tl.sqrt_rn(softplus(logit))
    return sigmoid(logit)


@triton.jit
def _descending_keys(key, cols, BLOCK_E: tl.constexpr):
    """Packs fp32 keys and column indices into int64s whose max is the next expert to pick."""
    finite = tl.minimum(tl.maximum(key, -FLT_MAX), FLT_MAX)
    key = tl.where(key != key, float("-inf"), finite)
    key = tl.where(key == 0.0, 0.0, key)
    bits = key.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | (BLOCK_E - 1 - cols).to(tl.int64)


@triton.jit(do_not_specialize=["n_rows"])
def _route_kernel(
    logits_ptr,
    bias_ptr,
    weights_ptr,
    ids_ptr,
    n_rows,
    n_experts,
    logits_row_stride,
    softcap,
    inv_softcap,
    scale,
    TOP_K: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROWS: tl.constexpr,
    SELECT_ON_LOGITS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    SQRT_SOFTPLUS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < n_experts
    valid = row_ok[:, None] & col_ok[None, :]
    row_logits = logits_ptr + rows[:, None] * logits_row_stride
    logits = tl.load(row_logits + cols[None, :], mask=valid, other=0.0).to(tl.float32)

    if SELECT_ON_LOGITS:
        key = logits
    else:
        key = _score(logits, softcap, inv_softcap, HAS_SOFTCAP, SQRT_SOFTPLUS)
        if HAS_BIAS:
            key = key + tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    packed = tl.where(valid, _descending_keys(key, cols[None, :], BLOCK_E), INT64_MIN)

    slots = tl.arange(0, BLOCK_K)[None, :]
    ids = tl.zeros((ROWS, BLOCK_K), dtype=tl.int32)
    for slot in range(TOP_K):
        best = tl.max(packed, axis=1)[:, None]
        ids = tl.where(slots == slot, BLOCK_E - 1 - (best & 0xFFFF).to(tl.int32), ids)
        packed = tl.where(packed == best, INT64_MIN, packed)

    slot_ok = row_ok[:, None] & (slots < TOP_K)
    chosen = tl.load(row_logits + ids, mask=slot_ok, other=0.0).to(tl.float32)
    if SELECT_ON_LOGITS:
        weights = sigmoid(chosen)
    else:
        weights = _score(chosen, softcap, inv_softcap, HAS_SOFTCAP, SQRT_SOFTPLUS)
    weights = tl.where((weights != weights) | ~slot_ok, 0.0, weights)
    if RENORMALIZE:
        total = tl.sum(weights, axis=1)[:, None]
        weights = tl.math.div_rn(weights, tl.where(total > 0.0, total, 1.0))
    weights = weights * scale

    out = rows[:, None] * TOP_K + slots
    tl.store(weights_ptr + out, weights, mask=slot_ok)
    tl.store(ids_ptr + out, ids, mask=slot_ok)


def _rows_per_program(block_e: int) -> int:
    """Rows per one-warp program: about 16 keys per thread, at most 16 rows."""
    return max(1, min(16, MAX_FUSED_EXPERTS // block_e))


def fused_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    softcap: float,
    routed_scaling_factor: float,
    renormalize: bool,
    select_on_logits: bool,
    score_func: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the router kernel. ``logits`` [T, E]; returns weights fp32 and ids int32 [T, k].

    ``score_func`` (one of ``SCORE_FUNCS``) applies to Laguna's routing, not to
    ``select_on_logits`` (Llama 4), whose weights are always the sigmoid of the chosen logits.
    """
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"unknown router score function {score_func!r}: expected one of {SCORE_FUNCS}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    n_rows, n_experts = logits.shape
    weights = torch.empty((n_rows, top_k), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n_rows, top_k), dtype=torch.int32, device=logits.device)
    if n_rows == 0:
        return weights, ids
    block_e = triton.next_power_of_2(n_experts)
    rows = _rows_per_program(block_e)
    has_bias = correction_bias is not None
    _route_kernel[(triton.cdiv(n_rows, rows),)](
        logits,
        correction_bias.contiguous() if has_bias else logits,
        weights,
        ids,
        n_rows,
        n_experts,
        logits.stride(0),
        float(softcap),
        1.0 / softcap if softcap > 0.0 else 0.0,
        float(routed_scaling_factor),
        TOP_K=top_k,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        ROWS=rows,
        SELECT_ON_LOGITS=select_on_logits,
        HAS_BIAS=has_bias,
        HAS_SOFTCAP=softcap > 0.0,
        RENORMALIZE=renormalize,
        SQRT_SOFTPLUS=score_func == "sqrtsoftplus",
        num_warps=1,
        enable_fp_fusion=True,
    )
    return weights, ids
