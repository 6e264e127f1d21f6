"""Laguna attention: per-layer head count, q/k RMSNorm, RoPE, sliding window, softplus gate.

``o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v) * softplus(g_proj(x)))`` where the gate
is per head (``g_proj`` has one output per head, broadcast over ``head_dim``) or per
element (``heads * head_dim`` outputs). Shapes on one tensor-parallel rank, T tokens:
q ``[T, H_local * D]``, k/v ``[T, KV_local * D]``, gate ``[T, H_local]`` or ``[T, H_local * D]``.

A config saying ``gating: true`` does not say which gate it means (transformers reads it
as per-head, Laguna-M.1's remote code as per-element), so the layer starts per-head and,
if the checkpoint's ``g_proj`` has ``heads * head_dim`` rows, rebuilds ``g_proj`` per
element while loading it. A gate the config names (``gating_types[i]`` or ``gating``) must
match the weight's row count.

With ``swa_attention_sink_enabled``, sliding layers carry ``sink`` ``[H_local]`` (checkpoint
``self_attn.sink`` ``[H]``, split by query head): one learnable logit per head that joins
the softmax denominator of every query, ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``
with ``s_j = scale * q.k_j``, so a head may attend to nothing. vLLM's attention backends
(CPU included) apply it, given as ``Attention(sinks=...)``.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import CacheConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs

from vllm_laguna import kernels
from vllm_laguna.configs.laguna import LagunaArch
from vllm_laguna.model_executor.layers.attention_heads import RankHeads
from vllm_laguna.model_executor.checkpoint import CheckpointError


class GatedAttention(nn.Module):
    def __init__(
        self,
        arch: LagunaArch,
        layer: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        total_heads = arch.heads_per_layer[layer]
        self.heads = RankHeads.for_this_rank(
            total_heads, arch.num_kv_heads, arch.head_dim, heads_field=f"num_attention_heads_per_layer[{layer}]"
        )
        self.head_dim = arch.head_dim
        self.total_heads = total_heads
        self.hidden_size = arch.hidden_size
        self.quant_config = quant_config
        self.prefix = prefix

        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size,
            arch.head_dim,
            total_heads,
            arch.num_kv_heads,
            bias=arch.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.o_proj = RowParallelLinear(
            total_heads * arch.head_dim,
            arch.hidden_size,
            bias=arch.attention_bias,
            quant_config=quant_config,
            prefix=f"{prefix}.o_proj",
        )
        self.gating = arch.gate(layer)
        self.gate_field = arch.gate_field(layer)
        if self.gating != "none":
            self.g_proj = self._make_g_proj(per_element=self.gating == "per-element")
        self.q_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps)
        self.k_norm = RMSNorm(arch.head_dim, eps=arch.rms_norm_eps)
        self.rotary_emb = get_rope(
            arch.head_dim,
            max_position=arch.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=arch.rope(layer),
        )
        sink = {}
        if arch.has_sink(layer):
            self.sink = nn.Parameter(torch.empty(self.heads.num_heads), requires_grad=False)
            set_weight_attrs(self.sink, {"weight_loader": sharded_weight_loader(0)})
            sink = {"sinks": self.sink}
        self.attn = Attention(
            self.heads.num_heads,
            arch.head_dim,
            arch.head_dim**-0.5,
            num_kv_heads=self.heads.num_kv_heads,
            cache_config=cache_config,
            quant_config=quant_config,
            per_layer_sliding_window=arch.window(layer),
            prefix=f"{prefix}.attn",
            **sink,
        )

    def _make_g_proj(self, per_element: bool) -> ColumnParallelLinear:
        g_proj = ColumnParallelLinear(
            self.hidden_size,
            self.total_heads * (self.head_dim if per_element else 1),
            bias=False,
            quant_config=self.quant_config,
            prefix=f"{self.prefix}.g_proj",
        )
        if isinstance(g_proj.quant_method, UnquantizedLinearMethod):
            g_proj.weight.weight_loader = self._load_g_proj
        return g_proj

    def _load_g_proj(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        """Checks the gate's row count against the config; for ``gating: true`` it picks the gate.

        Only installed on an unquantized ``g_proj`` (released checkpoints keep attention in
        bf16); a quantized one loads through vLLM's own loader.
        """
        per_head, per_element = self.total_heads, self.total_heads * self.head_dim
        rows = loaded.shape[0]
        expected = self.g_proj.output_size
        if rows != expected:
            if self.gating != "from-weights" or rows != per_element:
                raise CheckpointError(
                    f"{self.prefix}.g_proj.weight has {rows} rows; config `{self.gate_field}` "
                    f"({self.gating}) expects {expected} (per-head: {per_head}, "
                    f"per-element: {per_element})"
                )
            self.g_proj = self._make_g_proj(per_element=True).to(device=param.device, dtype=param.dtype)
            param = self.g_proj.weight
        ColumnParallelLinear.weight_loader(self.g_proj, param, loaded)

    def _qkv(self, positions: torch.Tensor, hidden_states: torch.Tensor):
        """q, k, v as attention takes them: q/k normed over head_dim, then rotated."""
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = self.heads.split_qkv(qkv)
        q = self.q_norm(q.reshape(-1, self.heads.num_heads, self.head_dim)).view(q.shape)
        k = self.k_norm(k.reshape(-1, self.heads.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        return q, k, v

    def key_value(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values ``[T, KV_local * D]`` this layer would cache for
        ``hidden_states`` (already normed) at ``positions`` — for K/V written straight into
        the cache (a DFlash drafter's context)."""
        _, k, v = self._qkv(positions, hidden_states)
        return k, v

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(positions, hidden_states)
        out = self.attn(q, k, v)
        if self.gating != "none":
            gate, _ = self.g_proj(hidden_states)
            out = kernels.softplus_gate(out, gate, self.head_dim)
        out, _ = self.o_proj(out)
        return out
