"""Poolside Laguna (``LagunaForCausalLM``) on vLLM's layers.

Decoder layer ``i``: ``h = x + attn_i(rmsnorm(x))``, ``x = h + mlp_i(rmsnorm(h))``, where

* ``attn_i`` has ``num_attention_heads_per_layer[i]`` query heads over a shared KV-head count,
  q/k RMSNorm before RoPE (per-layer-type parameters: default or YaRN, partial rotary), a
  sliding window on ``sliding_attention`` layers only, and a softplus output gate before
  ``o_proj`` (see :mod:`vllm_laguna.model_executor.layers.gated_attention`);
* ``mlp_i`` is a dense SwiGLU or a sigmoid-routed MoE with an ungated shared expert
  (:class:`LagunaSparseMoeBlock`).

The config is read once by :func:`vllm_laguna.configs.laguna.parse_laguna_config`; the
checkpoint layouts (Hub and transformers ``save_pretrained``) are mapped in
:data:`LagunaForCausalLM.hf_to_vllm_mapper` and checked by
:class:`vllm_laguna.model_executor.checkpoint.CheckpointAudit`.
"""

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig, get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.fused_moe import GateLinear
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.interfaces import SupportsEagle3
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from vllm_laguna.configs.laguna import LagunaArch, parse_laguna_config
from vllm_laguna.model_executor.checkpoint import CheckpointAudit
from vllm_laguna.model_executor.cpu_support import cpu_routing_method, expert_scheme
from vllm_laguna.model_executor.layers.experts import ExpertPlacement, fused_experts
from vllm_laguna.model_executor.layers.gated_attention import GatedAttention
from vllm_laguna.model_executor.layers.routing import LagunaTopKRouter
from vllm_laguna.model_executor.layers.swiglu import SwiGLU
from vllm_laguna.model_executor.models.causal_lm import (
    QKV_SHARDS,
    DecoderModel,
    MoECausalLM,
    PreNormDecoderLayer,
    swiglu_shards,
)


class LagunaSparseMoeBlock(nn.Module):
    """Routed experts (sigmoid or sqrt-softplus scores, :class:`LagunaTopKRouter`) x routed
    scaling factor, plus an ungated shared expert.

    The router logits come from ``gate`` in fp32; ``gate.e_score_correction_bias`` (fp32)
    only steers selection. vLLM's fused-MoE runner adds the shared expert and does the
    tensor-parallel all-reduce once for both.
    """

    def __init__(self, arch: LagunaArch, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if get_tensor_model_parallel_world_size() > arch.num_experts:
            raise ValueError(
                f"tensor_parallel_size={get_tensor_model_parallel_world_size()} exceeds "
                f"num_experts={arch.num_experts}"
            )
        self.gate = GateLinear(
            arch.hidden_size,
            arch.num_experts,
            bias=False,
            out_dtype=torch.float32,
            quant_config=None,
            prefix=f"{prefix}.gate",
        )
        self.gate.e_score_correction_bias = nn.Parameter(
            torch.zeros(arch.num_experts, dtype=torch.float32), requires_grad=False
        )
        self.shared_expert = (
            SwiGLU(
                arch.hidden_size,
                arch.shared_expert_intermediate_size,
                quant_config,
                reduce_results=False,
                prefix=f"{prefix}.shared_expert",
            )
            if arch.shared_expert_intermediate_size > 0
            else None
        )
        placement = ExpertPlacement.of(get_current_vllm_config(), arch.num_experts)
        router = LagunaTopKRouter(
            top_k=arch.top_k,
            num_experts=arch.num_experts,
            correction_bias=self.gate.e_score_correction_bias,
            softcap=arch.router_logit_softcapping,
            routed_scaling_factor=arch.routed_scaling_factor,
            score_func=arch.router_score_func,
            eplb_state=placement.router_eplb_state(),
            cpu_routing_method=cpu_routing_method(expert_scheme(quant_config, f"{prefix}.experts")),
        )
        self.experts = fused_experts(
            placement,
            prefix=f"{prefix}.experts",
            top_k=arch.top_k,
            hidden_size=arch.hidden_size,
            intermediate_size=arch.moe_intermediate_size,
            renormalize=True,
            quant_config=quant_config,
            router=router,
            scoring_func=arch.router_score_func,
            shared_experts=self.shared_expert,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.gate(x)
        return self.experts(hidden_states=x, router_logits=router_logits.float())


class LagunaDecoderLayer(PreNormDecoderLayer):
    def __init__(
        self,
        arch: LagunaArch,
        layer: int,
        cache_config: CacheConfig | None,
        quant_config: QuantizationConfig | None,
        prefix: str,
    ):
        super().__init__()
        self.self_attn = GatedAttention(
            arch,
            layer,
            cache_config=cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.self_attn",
        )
        if arch.mlp_layer_types[layer] == "sparse":
            self.mlp = LagunaSparseMoeBlock(arch, quant_config, prefix=f"{prefix}.mlp")
        else:
            self.mlp = SwiGLU(
                arch.hidden_size, arch.intermediate_size, quant_config, prefix=f"{prefix}.mlp"
            )
        self.input_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)


@support_torch_compile
class LagunaModel(DecoderModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        arch = parse_laguna_config(vllm_config.model_config.hf_text_config)
        super().__init__(
            arch,
            lambda i, p: LagunaDecoderLayer(arch, i, vllm_config.cache_config, vllm_config.quant_config, prefix=p),
            arch.rms_norm_eps,
            prefix,
        )


class LagunaForCausalLM(MoECausalLM, SupportsEagle3):
    """vLLM entry point for ``LagunaForCausalLM`` checkpoints (Hub or transformers layout).

    A speculative-decoding target for EAGLE-3 and DFlash drafters (Laguna-XS.2's DFlash
    drafter reads the residual stream after ``dflash_config.target_layer_ids``): the aux
    hidden states come from the shared frame (:class:`DecoderModel`); without a layer list
    from the drafter's config vLLM asks ``get_eagle3_default_aux_hidden_state_layers``
    (SupportsEagle3's ``(2, L // 2, L - 3)``).
    """

    model_cls = LagunaModel
    # transformers' save_pretrained layout -> the Hub layout our modules are named after.
    # Fused experts (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) keep
    # their names: vLLM's fused-MoE loader splits them.
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={
            ".mlp.shared_experts.": ".mlp.shared_expert.",
            ".mlp.experts.e_score_correction_bias": ".mlp.gate.e_score_correction_bias",
        },
        orig_to_new_stacked=QKV_SHARDS | swiglu_shards(".shared_expert", ".mlp"),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        audit = CheckpointAudit(laguna_checkpoint_keys(self.model.arch))
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(self.with_expert_replicas(audit.watch(weights)), mapper=self.hf_to_vllm_mapper)
        audit.raise_if_incomplete()
        return loaded


def laguna_checkpoint_keys(arch: LagunaArch) -> CheckpointAudit.Spec:
    """What a complete Laguna checkpoint holds, in both layouts (see CheckpointAudit)."""
    spec = CheckpointAudit.Spec()
    spec.require("model.embed_tokens.weight", "model.norm.weight")
    if not arch.tie_word_embeddings:
        spec.require("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        spec.require(f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight")
        attn = [f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"]
        attn += [f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"]
        if arch.gating != "none":
            attn.append(f"{p}.self_attn.g_proj.weight")
        if arch.has_sink(i):
            attn.append(f"{p}.self_attn.sink")
        spec.require(*attn)
        if arch.attention_bias:
            spec.require(*(f"{p}.self_attn.{n}_proj.bias" for n in "qkvo"))
        if arch.mlp_layer_types[i] == "dense":
            spec.require(*(f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")))
            continue
        spec.require(f"{p}.mlp.gate.weight")
        spec.require_one_of(
            f"{p}.mlp.experts.e_score_correction_bias", f"{p}.mlp.gate.e_score_correction_bias"
        )
        if arch.shared_expert_intermediate_size > 0:
            for n in ("gate", "up", "down"):
                spec.require_one_of(
                    f"{p}.mlp.shared_expert.{n}_proj.weight", f"{p}.mlp.shared_experts.{n}_proj.weight"
                )
        spec.require_experts(f"{p}.mlp.experts", arch.num_experts)
    return spec
