"""Sigmoid top-k MoE routing: the torch reference (Laguna and Llama 4 variants).

Laguna (sigmoid + selection bias, DeepSeek-V3 "noaux" style):
``softcap -> sigmoid -> top-k of (score + bias) -> unbiased scores of the chosen ->
renormalise -> x routed_scaling_factor``.
Llama 4: ``top-k of the raw logits -> sigmoid of the chosen`` (no renormalisation; the
weights multiply the expert *input*).

Contract shared with the fused kernels that sit beside this reference:

* ``logits``: ``[T, E]`` fp32 or bf16; computed in fp32.
* returns ``(weights [T, k] fp32, ids [T, k] int32)``, ids ordered by descending score.
* ties are broken by the lowest expert index;
* rows holding NaN or +-Inf (padding) still yield k distinct ids in ``[0, E)`` and finite
  weights, so nothing downstream indexes out of range.
"""

from __future__ import annotations

import torch


def _topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties to the lowest index; NaN ranks last."""
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    # A stable descending sort keeps equal keys in index order: exact lowest-index ties.
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def sigmoid_topk_reference(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    softcap: float = 0.0,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Laguna routing in plain torch. See the module docstring for the contract."""
    logits = logits.float()
    if softcap > 0.0:
        logits = torch.tanh(logits / softcap) * softcap
    scores = torch.sigmoid(logits)
    selection = scores if correction_bias is None else scores + correction_bias.float()
    ids = _topk_lowest_index(selection, top_k)
    weights = torch.nan_to_num(scores.gather(1, ids), nan=0.0)
    if renormalize:
        total = weights.sum(dim=-1, keepdim=True)
        weights = weights / torch.where(total > 0, total, torch.ones_like(total))
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return weights, ids.to(torch.int32)


def llama4_topk_reference(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 routing in plain torch: top-k of raw logits, sigmoid of the chosen."""
    logits = logits.float()
    ids = _topk_lowest_index(logits, top_k)
    weights = torch.nan_to_num(torch.sigmoid(logits.gather(1, ids)), nan=0.0)
    return weights, ids.to(torch.int32)
