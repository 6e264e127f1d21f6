"""Softplus output gate of Laguna attention: the torch reference.

``out = attn * softplus(gate)`` with the softplus computed in fp32 and cast back to the
activation dtype before the product, exactly as transformers does.

* ``attn``: ``[T, H * D]`` attention output (H local heads of size D).
* ``gate``: ``[T, H]`` (one gate per head, broadcast over D) or ``[T, H * D]`` (per element).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def softplus_gate_reference(attn: torch.Tensor, gate: torch.Tensor, head_dim: int) -> torch.Tensor:
    g = F.softplus(gate.float()).to(attn.dtype)
    if g.shape[-1] == attn.shape[-1]:
        return attn * g
    tokens = attn.shape[0]
    return (attn.view(tokens, -1, head_dim) * g.unsqueeze(-1)).view(tokens, -1)
