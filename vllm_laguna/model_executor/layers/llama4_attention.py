"""Llama 4 text attention: RoPE + chunked local attention, or NoPE + global attention.

Per layer ``i`` (see :class:`vllm_laguna.configs.llama4.Llama4Arch`):

* RoPE layers rotate q and k in transformers' complex-pair layout (dims ``2j`` and
  ``2j + 1`` form one pair, ``torch.view_as_complex``), which is vLLM's GPT-J style
  rotation (``is_neox_style=False``): the checkpoint's q/k weights are used as stored.
  With ``use_qk_norm`` q and k are then RMS-normalised over ``head_dim`` without a weight
  (transformers' ``Llama4TextL2Norm``, eps ``rms_norm_eps``, in fp32). They attend within
  their ``attention_chunk_size`` chunk of absolute positions (``pos // chunk`` equal),
  through vLLM's :class:`ChunkedLocalAttention`.
* NoPE layers attend globally and, with ``attn_temperature_tuning``, scale q per token
  (:func:`attention_temperature`). The scale is exactly 1 below position ``floor_scale - 1``,
  so an engine whose ``max_model_len`` stays below ``floor_scale`` skips the multiply (the
  same numbers, fewer ops a step; vLLM's in-tree model switches the tuning off there too).

Shapes on one tensor-parallel rank, T tokens: q ``[T, H_local * D]``, k/v
``[T, KV_local * D]``, positions ``[T]`` (absolute, per request).
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention, ChunkedLocalAttention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope

from vllm_laguna.model_executor.layers.attention_heads import RankHeads
from vllm_laguna.configs.llama4 import Llama4Arch


def attention_temperature(positions: torch.Tensor, floor_scale: float, attn_scale: float) -> torch.Tensor:
    """``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1`` per token, fp32 ``[T, 1]``.

    The same ops in the same order as transformers (fp32, ``log1p``), so the scale is
    bit-identical; 1.0 below ``floor_scale - 1``, growing logarithmically after.
    """
    scale = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return scale.unsqueeze(-1)


class Llama4Attention(nn.Module):
    def __init__(
        self,
        arch: Llama4Arch,
        layer: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
        max_model_len: int | None = None,
    ):
        super().__init__()
        self.heads = RankHeads.for_this_rank(arch.num_heads, arch.num_kv_heads, arch.head_dim)
        self.head_dim = arch.head_dim

        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size,
            arch.head_dim,
            arch.num_heads,
            arch.num_kv_heads,
            bias=arch.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            arch.num_heads * arch.head_dim,
            arch.hidden_size,
            bias=arch.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.rotary_emb = (
            get_rope(
                arch.head_dim,
                max_position=arch.max_position_embeddings,
                is_neox_style=False,  # complex pairs (2j, 2j + 1), as transformers
                rope_parameters=arch.rope,
            )
            if arch.uses_rope[layer]
            else None
        )
        self.qk_norm = (
            RMSNorm(arch.head_dim, eps=arch.rms_norm_eps, has_weight=False) if arch.qk_norm(layer) else None
        )
        # positions run to max_model_len - 1: below floor_scale - 1 every scale is exactly 1
        reaches_floor = max_model_len is None or max_model_len >= arch.floor_scale
        self.temperature = (arch.floor_scale, arch.attn_scale) if arch.temperature(layer) and reaches_floor else None

        common = dict(
            num_kv_heads=self.heads.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )
        chunk = arch.chunk_size(layer)
        if chunk is not None:
            self.attn = ChunkedLocalAttention(
                self.heads.num_heads, arch.head_dim, arch.head_dim**-0.5, attention_chunk_size=chunk, **common
            )
        else:
            self.attn = Attention(self.heads.num_heads, arch.head_dim, arch.head_dim**-0.5, **common)

    def _norm_heads(self, x: torch.Tensor, num_heads: int) -> torch.Tensor:
        return self.qk_norm(x.reshape(-1, num_heads, self.head_dim)).view(x.shape)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = self.heads.split_qkv(qkv)
        if self.rotary_emb is not None:
            q, k = self.rotary_emb(positions, q, k)
        if self.qk_norm is not None:
            q = self._norm_heads(q, self.heads.num_heads)
            k = self._norm_heads(k, self.heads.num_kv_heads)
        if self.temperature is not None:
            q = (q * attention_temperature(positions, *self.temperature)).to(q.dtype)
        out = self.attn(q, k, v)
        out, _ = self.o_proj(out)
        return out
