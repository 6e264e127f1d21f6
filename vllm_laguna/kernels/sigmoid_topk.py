"""Sigmoid top-k MoE routing (Laguna and Llama 4 variants): torch reference and dispatch.

Laguna (scores + selection bias, DeepSeek-V3 "noaux" style):
``softcap -> score -> top-k of (score + bias) -> unbiased scores of the chosen ->
renormalise -> x routed_scaling_factor``, where the score is ``sigmoid`` (every released
checkpoint) or ``sqrt(softplus)`` (config ``moe_router_score_func: "sqrtsoftplus"``, Poolside's
next releases, as mlx-lm implements it). Both scores rise with the logit, so without a bias
they pick the same experts; the bias and the weights tell them apart.
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
import torch.nn.functional as F

from vllm_laguna.kernels.dispatch import register_op, run_fused, use_triton

# The fused kernel's limits (a row's keys live in one warp's registers, k max-steps);
# larger shapes run the reference.
MAX_FUSED_EXPERTS = 512
MAX_FUSED_TOP_K = 32

#: Laguna's router score functions (config ``moe_router_score_func``), the default first
SCORE_FUNCS = ("sigmoid", "sqrtsoftplus")


def router_scores(logits: torch.Tensor, score_func: str) -> torch.Tensor:
    """Laguna's expert scores from fp32 (soft-capped) logits: ``sigmoid`` or ``sqrt(softplus)``.

    sqrt(softplus) is unbounded: +-Inf logits count as +-FLT_MAX (as the selection keys do),
    so a padding row of +Inf still gets finite weights.
    """
    if score_func == "sigmoid":
        return torch.sigmoid(logits)
    if score_func == "sqrtsoftplus":
        finite = torch.finfo(torch.float32).max
        return torch.sqrt(F.softplus(logits.clamp(-finite, finite)))
    raise ValueError(f"unknown router score function {score_func!r}: expected one of {SCORE_FUNCS}")


def _topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest entries per row, ties to the lowest index; NaN ranks last."""
    scores = torch.nan_to_num(scores, nan=float("-inf"))
    if k == 1:
        # Llama 4's top-1: argmax returns the first maximum, and compiles to a fused
        # reduction where the sort is an extern call (~45 us a call at one row on CPU).
        return scores.argmax(dim=-1, keepdim=True)
    # A stable descending sort keeps equal keys in index order: exact lowest-index ties.
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k]


def sigmoid_topk_reference(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    softcap: float = 0.0,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    score_func: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Laguna routing in plain torch. See the module docstring for the contract."""
    logits = logits.float()
    if softcap > 0.0:
        logits = torch.tanh(logits / softcap) * softcap
    scores = router_scores(logits, score_func)
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


def _fused_sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    softcap: float,
    routed_scaling_factor: float,
    renormalize: bool,
    score_func: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    from vllm_laguna.kernels.sigmoid_topk_triton import fused_topk

    return fused_topk(
        logits, correction_bias, top_k, softcap, routed_scaling_factor, renormalize, False, score_func
    )


def _fused_llama4_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    from vllm_laguna.kernels.sigmoid_topk_triton import fused_topk

    return fused_topk(logits, None, top_k, 0.0, 1.0, False, True, "sigmoid")


def _routing_outputs(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (logits.shape[0], top_k)
    return logits.new_empty(shape, dtype=torch.float32), logits.new_empty(shape, dtype=torch.int32)


_sigmoid_topk_op = register_op(
    "sigmoid_topk",
    "(Tensor logits, Tensor? correction_bias, int top_k, float softcap, "
    "float routed_scaling_factor, bool renormalize, str score_func) -> (Tensor, Tensor)",
    _fused_sigmoid_topk,
    lambda logits, correction_bias, top_k, softcap, scale, renormalize, score_func: _routing_outputs(logits, top_k),
)
_llama4_topk_op = register_op(
    "llama4_topk",
    "(Tensor logits, int top_k) -> (Tensor, Tensor)",
    _fused_llama4_topk,
    _routing_outputs,
)


def _fused_path(logits: torch.Tensor, top_k: int) -> bool:
    if logits.dim() != 2:
        raise ValueError(f"router logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    num_experts = logits.shape[1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
    return use_triton(logits) and num_experts <= MAX_FUSED_EXPERTS and top_k <= MAX_FUSED_TOP_K


def sigmoid_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor | None,
    top_k: int,
    softcap: float = 0.0,
    routed_scaling_factor: float = 1.0,
    renormalize: bool = True,
    score_func: str = "sigmoid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Laguna routing: the fused kernel where it runs (see ``dispatch``), else the reference."""
    if _fused_path(logits, top_k):
        args = (logits, correction_bias, top_k, float(softcap), float(routed_scaling_factor), renormalize)
        args += (score_func,)
        return run_fused(_sigmoid_topk_op, _fused_sigmoid_topk, *args)
    return sigmoid_topk_reference(
        logits, correction_bias, top_k, softcap, routed_scaling_factor, renormalize, score_func
    )


def llama4_topk(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4 routing: the fused kernel where it runs (see ``dispatch``), else the reference."""
    if _fused_path(logits, top_k):
        return run_fused(_llama4_topk_op, _fused_llama4_topk, logits, top_k)
    return llama4_topk_reference(logits, top_k)
