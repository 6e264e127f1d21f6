"""Laguna's DFlash drafter (poolside's ``Laguna-*-DFlash``; vLLM architecture
``DFlashLagunaForCausalLM``) on this package's Laguna layers.

DFlash drafts a block of tokens in one forward. Per step, vLLM's ``DFlashProposer``:

1. takes the target's aux hidden states ``[N, n_aux * H]`` (the residual stream after each of
   ``dflash_config.target_layer_ids``, from the target's ``SupportsEagle3`` interface) and calls
   :meth:`LagunaDFlashForCausalLM.combine_hidden_states`: each slice RMS-normed by its own
   ``aux_hidden_norms[j]``, concatenated, projected by ``fc`` and normed (``hidden_norm``) into
   context states ``[N, H]``;
2. calls :meth:`~LagunaDFlashForCausalLM.precompute_and_store_context_kv`: every drafter layer
   turns the context states into keys and values as its attention would (its
   ``input_layernorm``, then ``qkv_proj``, k-norm, RoPE at the context positions) and writes them
   straight into its KV cache;
3. runs :meth:`~LagunaDFlashForCausalLM.forward` on the query block only — the last accepted
   token then ``num_speculative_tokens`` copies of ``mask_token_id`` — attending to the cached
   context (causally, and within the sliding window, for ``sliding_attention`` drafters), and
   samples the masked positions from the target's LM head.

The drafter layers are :class:`~vllm_laguna.model_executor.models.laguna.LagunaDecoderLayer`
(gated attention, dense SwiGLU); the embedding and LM head are the target's (vLLM swaps them
in after loading). Attention layers are named after the target's (``model.layers.{L + i}``
for a target of ``L`` layers), as vLLM's DFlash drafters are, so both share one KV-cache
manager; their KV cache is allocated as full attention, because context K/V are written at
absolute slots, while the compute keeps the window. vLLM needs all of them in one KV-cache
group, which bounds the drafter's depth on a hybrid target: checked at construction
(``configs/laguna_dflash.py``, ``check_kv_cache_grouping``).

Why not vLLM's own ``DFlashLagunaForCausalLM``: it builds vLLM's in-tree Laguna layers and
stacks every layer's norm weights into one ``ops.rms_norm`` call, which vLLM's CPU kernel
does not support (it applies the first layer's weight to all layers, and reads past the end
of its stride-0 expanded input), so on the CPU backend its context K/V are wrong for every
layer after the first. Here each layer computes its own context K/V with its own modules.

The class derives from vLLM's generic DFlash drafter, ``DFlashQwen3ForCausalLM``, for one
reason: vLLM 0.32's V1 proposer (the one the CPU backend runs) accepts only its own drafter
classes (an ``isinstance`` check in ``SpecDecodeBaseProposer.propose``). Every method the
proposer and loader call is defined here; nothing of the Qwen3 drafter runs.
"""

from collections.abc import Iterable

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.qwen3_dflash import DFlashQwen3ForCausalLM, dflash_has_any_non_causal
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    get_draft_quant_config,
    maybe_prefix,
    process_eagle_weight,
)

from vllm_laguna.configs.laguna import parse_laguna_config
from vllm_laguna.configs.laguna_dflash import LagunaDFlashArch, check_kv_cache_grouping, parse_laguna_dflash_config
from vllm_laguna.model_executor.checkpoint import CheckpointAudit
from vllm_laguna.model_executor.models.causal_lm import swiglu_shards
from vllm_laguna.model_executor.models.laguna import LagunaDecoderLayer


@support_torch_compile
class LagunaDFlashModel(nn.Module):
    """The drafter body: embedding (the target's), Laguna layers, final norm; and the
    aux-hidden-state encoder (``aux_hidden_norms``, ``fc``, ``hidden_norm``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        target = vllm_config.model_config
        draft_config = vllm_config.speculative_config.draft_model_config.hf_config
        num_target_layers = target.get_total_num_hidden_layers()
        self.arch: LagunaDFlashArch = parse_laguna_dflash_config(
            draft_config, num_target_layers, target.get_vocab_size(), target.get_hidden_size()
        )
        check_kv_cache_grouping(
            self.arch,
            parse_laguna_config(target.hf_text_config),
            vllm_config.parallel_config.tensor_parallel_size,
            not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager,
        )
        layers = self.arch.layers
        quant_config = get_draft_quant_config(vllm_config)
        self.embed_tokens = VocabParallelEmbedding(
            layers.vocab_size, layers.hidden_size, prefix=maybe_prefix(prefix, "embed_tokens")
        )
        self.layers = nn.ModuleList(
            LagunaDecoderLayer(
                layers, i, vllm_config.cache_config, quant_config, prefix=f"{prefix}.layers.{num_target_layers + i}"
            )
            for i in range(layers.num_layers)
        )
        for layer in self.layers:
            # KV-cache spec without the window (context K/V sit at absolute slots); the
            # attention backend was built with it and keeps it for the compute.
            layer.self_attn.attn.sliding_window = None
        eps = layers.rms_norm_eps
        self.aux_hidden_norms = nn.ModuleList(
            RMSNorm(self.arch.target_hidden_size, eps=eps) for _ in self.arch.target_layer_ids
        )
        self.fc = ReplicatedLinear(
            len(self.arch.target_layer_ids) * self.arch.target_hidden_size,
            layers.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=maybe_prefix(prefix, "fc"),
            return_bias=False,
        )
        self.hidden_norm = RMSNorm(layers.hidden_size, eps=eps)
        self.norm = RMSNorm(layers.hidden_size, eps=eps)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LagunaDFlashForCausalLM(DFlashQwen3ForCausalLM):
    """vLLM entry point for Laguna DFlash drafter checkpoints (see the module docstring)."""

    packed_modules_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    # Drafter checkpoints store qkv_proj fused and the MLP unfused, without the `model.` prefix.
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_stacked=swiglu_shards(".mlp"))

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        nn.Module.__init__(self)
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        self.has_own_embed_tokens = False
        self.has_own_lm_head = False
        self.draft_id_to_target_id = None
        self.model = LagunaDFlashModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        arch = self.model.arch.layers
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(arch.vocab_size)
        self.causal = not dflash_has_any_non_causal(self.config)

    def embed_input_ids(self, input_ids: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, inputs_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def combine_hidden_states(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Aux hidden states ``[N, n_aux * H_target]`` -> context states ``[N, H]``."""
        width = self.model.arch.target_hidden_size
        expected = width * len(self.model.aux_hidden_norms)
        if hidden_states.shape[-1] != expected:
            raise ValueError(
                f"Laguna DFlash drafter expects {expected} aux hidden features (target layers "
                f"{list(self.model.arch.target_layer_ids)} x hidden {width}), got {hidden_states.shape[-1]}"
            )
        slices = hidden_states.split(width, dim=-1)
        normed = torch.cat([norm(s) for norm, s in zip(self.model.aux_hidden_norms, slices)], dim=-1)
        return self.model.hidden_norm(self.model.fc(normed))

    def precompute_and_store_context_kv(
        self,
        context_states: torch.Tensor,
        context_positions: torch.Tensor,
        context_slot_mapping: torch.Tensor | list[torch.Tensor | None] | None = None,
    ) -> None:
        """Write each drafter layer's K/V of the context states ``[N, H]`` at
        ``context_positions`` into its KV cache at ``context_slot_mapping`` (one tensor for
        all layers, or one per layer). Without slots (vLLM's profiling run) only computes."""
        for i, layer in enumerate(self.model.layers):
            key, value = layer.self_attn.key_value(context_positions, layer.input_layernorm(context_states))
            slots = context_slot_mapping[i] if isinstance(context_slot_mapping, (list, tuple)) else context_slot_mapping
            if slots is None:
                continue
            attn = layer.self_attn.attn
            shape = (-1, attn.num_kv_heads, attn.head_size)
            attn.impl.do_kv_cache_update(attn, key.view(shape), value.view(shape), attn.kv_cache, slots)

    def get_draft_kv_cache_layer_names(self) -> list[str]:
        return [layer.self_attn.attn.layer_name for layer in self.model.layers]

    def get_draft_attn_causal(self) -> list[bool]:
        return [self.causal] * len(self.model.layers)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        audit = CheckpointAudit(laguna_dflash_checkpoint_keys(self.model.arch))

        def under_model(stream):
            for name, tensor in stream:
                process_eagle_weight(self, name)
                yield (name if name.startswith("lm_head.") else f"model.{name}"), tensor

        loaded = AutoWeightsLoader(self).load_weights(under_model(audit.watch(weights)), mapper=self.hf_to_vllm_mapper)
        audit.raise_if_incomplete()
        # Unless the checkpoint has its own, shared with the target (the proposer swaps them in).
        return loaded | {"lm_head.weight", "model.embed_tokens.weight"}


def laguna_dflash_checkpoint_keys(arch: LagunaDFlashArch) -> CheckpointAudit.Spec:
    """What a complete Laguna DFlash drafter checkpoint holds (see CheckpointAudit)."""
    spec = CheckpointAudit.Spec()
    spec.require("fc.weight", "hidden_norm.weight", "norm.weight")
    spec.require(*(f"aux_hidden_norms.{j}.weight" for j in range(len(arch.target_layer_ids))))
    for i in range(arch.layers.num_layers):
        p = f"layers.{i}"
        spec.require(f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight")
        spec.require(*(f"{p}.self_attn.{n}.weight" for n in ("qkv_proj", "o_proj", "q_norm", "k_norm")))
        if arch.layers.gate(i) != "none":
            spec.require(f"{p}.self_attn.g_proj.weight")
        if arch.layers.has_sink(i):
            spec.require(f"{p}.self_attn.sink")
        spec.require(*(f"{p}.mlp.{n}_proj.weight" for n in ("gate", "up", "down")))
    return spec
