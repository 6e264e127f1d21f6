"""Softplus output gate of Laguna attention: torch reference and dispatch.

``out = attn * softplus(gate)`` with the softplus computed in fp32 and cast back to the
activation dtype before the product, exactly as transformers does.

* ``attn``: ``[T, H * D]`` attention output (H local heads of size D).
* ``gate``: ``[T, H]`` (one gate per head, broadcast over D) or ``[T, H * D]`` (per element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vllm_laguna.kernels.dispatch import register_op, run_fused, use_triton


def softplus_gate_reference(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    g = F.softplus(gate.float()).to(attn.dtype)
    if g.shape[-1] == attn.shape[-1]:
        return attn * g
    tokens = attn.shape[0]
    return (attn.view(tokens, -1, head_dim) * g.unsqueeze(-1)).view(tokens, -1)


def _fused_softplus_gate(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    from vllm_laguna.kernels.gated_output_triton import fused_softplus_gate

    return fused_softplus_gate(attn, gate, head_dim)


# Functional (returns a fresh tensor) rather than writing into a caller's buffer: the
# product is a single read-read-write pass either way, o_proj accepts any input tensor, and
# under Inductor a mutating op becomes ``auto_functionalized``, which vLLM 0.32's
# FixFunctionalizationPass only undoes for vLLM's own ops (a copy risk, not a saving).
_softplus_gate_op = register_op(
    "softplus_gate",
    "(Tensor attn, Tensor gate, int head_dim) -> Tensor",
    _fused_softplus_gate,
    lambda attn, gate, head_dim: attn.new_empty(attn.shape),
)


def _check_shapes(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> None:
    if attn.dim() != 2 or gate.dim() != 2 or gate.shape[0] != attn.shape[0]:
        raise ValueError(
            f"softplus_gate expects attn [T, H*D] and gate [T, H] or [T, H*D], got "
            f"{tuple(attn.shape)} and {tuple(gate.shape)}"
        )
    width = attn.shape[1]
    if head_dim < 1 or width % head_dim or gate.shape[1] not in (width // head_dim, width):
        raise ValueError(
            f"softplus_gate: gate width {gate.shape[1]} must be the head count "
            f"{width // max(head_dim, 1)} or attn width {width} (head_dim={head_dim})"
        )


def softplus_gate(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``attn * softplus(gate)``: the fused kernel where it runs (see ``dispatch``), else the reference."""
    _check_shapes(attn, gate, head_dim)
    if use_triton(attn):
        return run_fused(_softplus_gate_op, _fused_softplus_gate, attn, gate, head_dim)
    return softplus_gate_reference(attn, gate, head_dim)
