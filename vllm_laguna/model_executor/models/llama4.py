"""Llama 4 text (``Llama4ForCausalLM``) on vLLM's layers, equal to transformers.

Decoder layer ``i``: ``h = x + attn_i(rmsnorm(x))``, ``x = h + ffn_i(rmsnorm(h))``, where

* ``attn_i`` is a RoPE layer with chunked local attention and q/k norm, or a NoPE layer
  with global attention and attention temperature tuning
  (:mod:`vllm_laguna.model_executor.layers.llama4_attention`);
* ``ffn_i`` is the MoE (:mod:`vllm_laguna.model_executor.layers.llama4_moe`) on
  ``moe_layers``, a dense SwiGLU of width ``intermediate_size_mlp`` elsewhere.

Checkpoints: ``Llama4ForCausalLM`` ones, and the text tower of ``Llama4ForConditionalGeneration``
ones (tensors under ``language_model.``; ``vision_model.*`` and ``multi_modal_projector.*``
are skipped), with fused or per-expert expert tensors. A multimodal checkpoint runs text-only
on this class with ``hf_overrides={"architectures": ["Llama4ForCausalLM"]}``: vLLM's own
``Llama4ForConditionalGeneration`` builds vLLM's in-tree text tower, not this one.

The config is read once by :func:`vllm_laguna.configs.llama4.parse_llama4_config`.
"""

from collections.abc import Iterable

import torch

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.models.interfaces import SupportsEagle, SupportsEagle3
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from vllm_laguna.configs.llama4 import Llama4Arch, check_chunk_fits_kv_blocks, parse_llama4_config
from vllm_laguna.model_executor.checkpoint import CheckpointAudit
from vllm_laguna.model_executor.layers.llama4_attention import Llama4Attention
from vllm_laguna.model_executor.layers.llama4_moe import Llama4MoE
from vllm_laguna.model_executor.layers.swiglu import SwiGLU
from vllm_laguna.model_executor.models.causal_lm import (
    QKV_SHARDS,
    DecoderModel,
    MoECausalLM,
    PreNormDecoderLayer,
    swiglu_shards,
)


class Llama4DecoderLayer(PreNormDecoderLayer):
    ffn_name = "feed_forward"

    def __init__(self, vllm_config: VllmConfig, arch: Llama4Arch, layer: int, prefix: str):
        super().__init__()
        quant_config = vllm_config.quant_config
        self.self_attn = Llama4Attention(
            arch,
            layer,
            vllm_config.cache_config,
            quant_config,
            prefix=f"{prefix}.self_attn",
            max_model_len=vllm_config.model_config.max_model_len,
        )
        if arch.is_moe[layer]:
            self.feed_forward = Llama4MoE(arch, quant_config, prefix=f"{prefix}.feed_forward")
        else:
            self.feed_forward = SwiGLU(
                arch.hidden_size, arch.intermediate_size_mlp, quant_config, prefix=f"{prefix}.feed_forward"
            )
        self.input_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, eps=arch.rms_norm_eps)


@support_torch_compile
class Llama4Model(DecoderModel):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        arch = parse_llama4_config(vllm_config.model_config.hf_config)
        check_chunk_fits_kv_blocks(arch, vllm_config.cache_config.block_size)
        super().__init__(
            arch, lambda i, p: Llama4DecoderLayer(vllm_config, arch, i, prefix=p), arch.rms_norm_eps, prefix
        )


#: where a multimodal checkpoint keeps the text tower, and what else it holds
MULTIMODAL_PREFIXES = WeightsMapper(
    orig_to_new_prefix={
        "language_model.": "",
        "vision_model.": None,
        "multi_modal_projector.": None,
    }
)


class Llama4ForCausalLM(MoECausalLM, SupportsEagle, SupportsEagle3):
    """vLLM entry point for Llama 4 text checkpoints (and multimodal ones' text tower).

    A speculative-decoding target as vLLM's in-tree class (a ``LlamaForCausalLM``) is: EAGLE
    needs nothing of the target, EAGLE-3 the aux hidden states of the shared frame.
    """

    model_cls = Llama4Model
    # Fused experts keep their names: vLLM's fused-MoE loader splits (and, being stored
    # as `x @ W`, transposes) them; so do per-expert tensors.
    hf_to_vllm_mapper = MULTIMODAL_PREFIXES | WeightsMapper(
        orig_to_new_stacked=QKV_SHARDS | swiglu_shards(".shared_expert", ".feed_forward"),
    )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        # The audit sees text-model names, whichever layout the checkpoint has.
        audit = CheckpointAudit(llama4_checkpoint_keys(self.model.arch))
        text_weights = audit.watch(MULTIMODAL_PREFIXES.apply(weights))
        loaded = AutoWeightsLoader(self).load_weights(self.with_expert_replicas(text_weights), mapper=self.hf_to_vllm_mapper)
        audit.raise_if_incomplete()
        return loaded


def llama4_checkpoint_keys(arch: Llama4Arch) -> CheckpointAudit.Spec:
    """What a complete Llama 4 text checkpoint holds (see CheckpointAudit)."""
    spec = CheckpointAudit.Spec()
    spec.require("model.embed_tokens.weight", "model.norm.weight")
    if not arch.tie_word_embeddings:
        spec.require("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        spec.require(f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight")
        spec.require(*(f"{p}.self_attn.{n}_proj.weight" for n in "qkvo"))
        if arch.attention_bias:
            spec.require(*(f"{p}.self_attn.{n}_proj.bias" for n in "qkvo"))
        ffn = f"{p}.feed_forward"
        if not arch.is_moe[i]:
            spec.require(*(f"{ffn}.{n}_proj.weight" for n in ("gate", "up", "down")))
            continue
        spec.require(f"{ffn}.router.weight")
        spec.require(*(f"{ffn}.shared_expert.{n}_proj.weight" for n in ("gate", "up", "down")))
        spec.require_experts(f"{ffn}.experts", arch.num_experts)
    return spec
