"""The frame every model here shares: token embeddings, pre-norm residual layers, a final
norm, an LM head — split into pipeline-parallel stages, and reporting the residual stream
at chosen layers to an EAGLE-3/DFlash drafter.

A model file defines its token mixer(s) and feed-forward, a ``PreNormDecoderLayer`` subclass
holding them under their checkpoint names, a ``DecoderModel`` subclass (decorated with
``@support_torch_compile``) that builds ``arch``, ``embed_tokens``, ``layers`` and ``norm``,
and a ``CausalLM`` subclass naming it in ``model_cls`` and mapping its checkpoint names.

Pipeline parallelism follows vLLM's models: this rank builds only its slice of the layers
(``make_layers``; the others are ``PPMissingLayer``, which vLLM's weight loader skips), the
embedding on the first rank (and on the last when tied, or when a drafter there shares it),
the final norm and LM head on the last rank. Between ranks the residual stream travels as
``IntermediateTensors({"hidden_states", "residual"})``.
"""

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed import get_pp_group
from vllm.logger import init_logger
from vllm.model_executor.layers.fused_moe import MoERunner
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.interfaces import (
    EagleModelMixin,
    MixtureOfExperts,
    SupportsLoRA,
    SupportsPP,
    SupportsQuant,
)
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    extract_layer_index,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
    spec_decode_needs_target_embed,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from vllm_laguna.model_executor.cpu_support import check_model
from vllm_laguna.model_executor.layers.cpu_gemm import use_fp32_gemms_for_bf16
from vllm_laguna.model_executor.layers.experts import (
    lora_targets_without_routed_experts,
    refuse_routed_expert_adapters,
    replicate_fused_experts,
)

if TYPE_CHECKING:
    from vllm.lora.model_manager import LoRAModelManager

logger = init_logger(__name__)


#: checkpoint q/k/v projections -> shards of vLLM's fused ``qkv_proj`` (a ``WeightsMapper``'s
#: ``orig_to_new_stacked`` entries)
QKV_SHARDS = {".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"), ".v_proj": (".qkv_proj", "v")}


def swiglu_shards(*parents: str) -> dict[str, tuple[str, int]]:
    """``{parent}.gate_proj``/``up_proj`` -> shards 0/1 of ``{parent}.gate_up_proj`` (see SwiGLU)."""
    return {
        f"{parent}.{proj}": (f"{parent}.gate_up_proj", shard)
        for parent in parents
        for shard, proj in enumerate(("gate_proj", "up_proj"))
    }


class PreNormDecoderLayer(nn.Module):
    """``h = x + mix(norm_1(x))``, ``out = h + ffn(norm_2(h))``, with vLLM's fused add+RMSNorm:
    the residual stream travels beside the hidden states as ``(hidden, residual)``.

    Subclasses register the norms and the feed-forward under their checkpoint names, list
    those names in ``norm_names``/``ffn_name``, and override :meth:`mix` if the token mixer
    is not ``self_attn(positions, x)``.
    """

    #: attribute names of the norm before the mixer and the norm before the feed-forward
    norm_names: ClassVar[tuple[str, str]] = ("input_layernorm", "post_attention_layernorm")
    ffn_name: ClassVar[str] = "mlp"

    def mix(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.self_attn(positions, hidden_states)

    def forward(
        self, positions: torch.Tensor, hidden_states: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mixer_norm = getattr(self, self.norm_names[0])
        ffn_norm = getattr(self, self.norm_names[1])
        if residual is None:
            residual = hidden_states
            hidden_states = mixer_norm(hidden_states)
        else:
            hidden_states, residual = mixer_norm(hidden_states, residual)
        hidden_states = self.mix(positions, hidden_states)
        hidden_states, residual = ffn_norm(hidden_states, residual)
        return getattr(self, self.ffn_name)(hidden_states), residual


class DecoderModel(nn.Module, EagleModelMixin):
    """``embed_tokens -> layers -> norm``; each layer maps ``(positions, hidden, residual)`` to
    ``(hidden, residual)`` and the final RMSNorm adds the last residual (vLLM's fused add+norm).

    Subclasses (``__init__(*, vllm_config, prefix)``, decorated with ``@support_torch_compile``)
    parse their config into ``arch`` (with ``vocab_size``, ``hidden_size``, ``num_layers``,
    ``tie_word_embeddings``) and pass it with a layer factory ``make_layer(index, prefix)``.

    On a pipeline-parallel rank only layers ``[start_layer, end_layer)`` exist. ``forward``
    returns ``IntermediateTensors`` on every rank but the last; on the last it returns the
    normed hidden states ``[T, H]`` — or ``(hidden, aux)`` once a drafter asked for aux hidden
    states (``set_aux_hidden_state_layers``): ``aux[j]`` is the residual stream ``hidden +
    residual`` ``[T, H]`` entering layer ``aux_hidden_state_layers[j]`` (index ``num_layers``:
    after the last layer, before the final norm). Earlier ranks pack theirs into the
    intermediate tensors under EagleModelMixin's keys for vLLM to relay to the last rank, as
    vLLM's Llama does (not run here: see docs/DESIGN.md §12).
    """

    supports_aux_hidden_states_over_pp = True

    def __init__(self, arch, make_layer: Callable[[int, str], nn.Module], norm_eps: float, prefix: str):
        super().__init__()
        self.arch = arch
        pp = get_pp_group()
        self.is_first_rank, self.is_last_rank = pp.is_first_rank, pp.is_last_rank
        needs_embedding = (
            self.is_first_rank
            or (arch.tie_word_embeddings and self.is_last_rank)
            or spec_decode_needs_target_embed(get_current_vllm_config())
        )
        self.embed_tokens = (
            VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, prefix=f"{prefix}.embed_tokens")
            if needs_embedding
            else PPMissingLayer()
        )
        self.start_layer, self.end_layer, self.layers = make_layers(
            arch.num_layers, lambda prefix: make_layer(extract_layer_index(prefix), prefix), prefix=f"{prefix}.layers"
        )
        self.norm = RMSNorm(arch.hidden_size, eps=norm_eps) if self.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], arch.hidden_size
        )

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors | tuple[torch.Tensor, list[torch.Tensor]]:
        aux: list[torch.Tensor] = []
        if self.is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_tokens(input_ids)
            residual = None
            self._maybe_add_hidden_state(aux, self.start_layer, hidden_states, residual)
        else:
            hidden_states, residual = intermediate_tensors["hidden_states"], intermediate_tensors["residual"]
        for index in range(self.start_layer, self.end_layer):
            hidden_states, residual = self.layers[index](positions, hidden_states, residual)
            self._maybe_add_hidden_state(aux, index + 1, hidden_states, residual)
        if not self.is_last_rank:
            return IntermediateTensors(
                {"hidden_states": hidden_states, "residual": residual, **self.pack_local_aux_hidden_states(aux)}
            )
        hidden_states, _ = self.norm(hidden_states, residual)
        aux = self.collect_remote_aux_hidden_states(intermediate_tensors) + aux
        return (hidden_states, aux) if aux else hidden_states


class CausalLM(nn.Module, SupportsLoRA, SupportsQuant, SupportsPP):
    """vLLM's model interface around a :class:`DecoderModel`: LM head (tied or not, on the
    last pipeline rank) and logits.

    LoRA: vLLM's LoRA manager wraps the parallel linear layers (and fused-MoE layers off the
    CPU backend; see :class:`MoECausalLM`) after loading. Adapters name checkpoint
    modules: ``hf_to_vllm_mapper``'s renames map them to ours, ``packed_modules_mapping``
    says which of them a fused layer holds, ``embedding_modules`` lets them change
    ``embed_tokens``/``lm_head``.
    """

    model_cls: ClassVar[type[DecoderModel]]
    #: fused modules -> the checkpoint modules they hold (LoRA adapters' and quant configs'
    #: module names)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    embedding_modules = {"embed_tokens": "input_embeddings", "lm_head": "output_embeddings"}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        if vllm_config.lora_config is not None and current_platform.is_cpu():
            logger.warning_once(
                "vLLM's CPU LoRA ops apply the adapter in the last LoRA slot to requests without "
                "an adapter that share a batch with adapter requests (vLLM PR #48421): keep "
                "max_loras above the number of adapters served so that slot stays empty."
            )
        self.config = vllm_config.model_config.hf_config
        self.model = self.model_cls(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        arch = self.model.arch
        if self.model.is_last_rank:
            self.lm_head = ParallelLMHead(
                arch.vocab_size,
                arch.hidden_size,
                quant_config=vllm_config.quant_config,
                prefix=maybe_prefix(prefix, "lm_head"),
            )
            if arch.tie_word_embeddings:
                self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        else:
            self.lm_head = PPMissingLayer()
        self.logits_processor = LogitsProcessor(arch.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        check_model(vllm_config, self)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor | IntermediateTensors | tuple[torch.Tensor, list[torch.Tensor]]:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def process_weights_after_loading(self) -> None:
        """vLLM's model-level hook, after every layer's own weight processing."""
        use_fp32_gemms_for_bf16(self)


class MoECausalLM(CausalLM, MixtureOfExperts):
    """A :class:`CausalLM` with vLLM fused-MoE layers, and vLLM's EPLB interface over them.

    ``moe_layers`` are the model's ``MoERunner`` layers in layer order (a model may also have
    dense layers; with none, ``num_moe_layers`` is 0 and vLLM treats the model as dense).
    Expert counts come from the layers themselves, which get them from
    :class:`vllm_laguna.model_executor.layers.experts.ExpertPlacement`: logical experts are the
    checkpoint's, physical ones add ``num_redundant_experts`` replicas, local ones are this
    expert-parallel rank's. ``set_eplb_state`` (vLLM's default) registers each layer's expert
    weights and hands the layer's router its slice of the EPLB maps.

    LoRA on the CPU backend, where vLLM has no MoE-LoRA kernel: an unset ``lora_target_modules``
    becomes every module vLLM would wrap but the routed experts, and the LoRA manager, when it
    registers itself (``lora_manager``), stops expecting routed-expert weights in adapters, so
    vLLM refuses an adapter carrying them (see :mod:`vllm_laguna.model_executor.layers.experts`).
    """

    #: the LoRA manager that registered itself (``SupportsLoRA.lora_manager``)
    _lora_manager: "LoRAModelManager | None" = None

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.moe_layers = [m for m in self.model.modules() if isinstance(m, MoERunner)]
        self.num_moe_layers = len(self.moe_layers)
        moe = self.moe_layers[0].moe_config if self.moe_layers else None
        self.num_expert_groups = 1 if moe else 0
        self.num_logical_experts = self.num_routed_experts = moe.num_logical_experts if moe else 0
        self.num_physical_experts = moe.num_experts if moe else 0
        self.num_local_physical_experts = moe.num_local_experts if moe else 0
        self.num_redundant_experts = self.num_physical_experts - self.num_logical_experts
        self.num_shared_experts = int(bool(self.moe_layers) and self.moe_layers[0].shared_experts is not None)
        lora_config = vllm_config.lora_config
        if lora_config is not None and lora_config.target_modules is None and current_platform.is_cpu():
            lora_config.target_modules = lora_targets_without_routed_experts(self)

    @property
    def lora_manager(self) -> "LoRAModelManager | None":
        return self._lora_manager

    @lora_manager.setter
    def lora_manager(self, manager: "LoRAModelManager") -> None:
        """vLLM's LoRA manager registers itself here once it has wrapped the model's layers; on
        the CPU backend it has wrapped no routed experts, and adapters carrying their weights
        are to be refused rather than loaded and not applied."""
        if current_platform.is_cpu():
            refuse_routed_expert_adapters(manager)
        self._lora_manager = manager

    def with_expert_replicas(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
        """The checkpoint stream with fused expert tensors covering the redundant replicas too
        (see :func:`vllm_laguna.model_executor.layers.experts.replicate_fused_experts`)."""
        return replicate_fused_experts(weights, self.num_logical_experts, self.num_redundant_experts)

    def update_physical_experts_metadata(self, num_physical_experts: int, num_local_physical_experts: int) -> None:
        """Elastic EP changed the rank count: same local experts per rank, new global count."""
        assert num_local_physical_experts == self.num_local_physical_experts
        self.num_physical_experts = num_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
        for layer in self.moe_layers:
            layer.update_expert_map()
