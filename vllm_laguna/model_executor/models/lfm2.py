"""LiquidAI LFM2 (``Lfm2ForCausalLM``) on vLLM's layers, with the conv state in vLLM's
hybrid (mamba-style) state cache.

Decoder layer ``i``: ``h = x + op_i(operator_norm(x))``, ``x = h + swiglu(ffn_norm(h))``, where
``op_i`` is GQA attention with q/k RMSNorm before RoPE (``full_attention`` layers) or the
gated short conv (``conv`` layers, :mod:`vllm_laguna.model_executor.layers.short_conv`);
then the final ``embedding_norm`` and the LM head, tied to the embeddings unless the
config says otherwise. No embedding scale, no biases outside the conv blocks.

The config, in either of its forms, is read once by
:func:`vllm_laguna.configs.lfm2.parse_lfm2_config`. Tensor names are the Hub's (which are
transformers' module names); q/k/v and w1/w3 are fused here, ``w2`` loads as ``down_proj`` and
``embedding_norm`` as the shared frame's ``norm``
(:mod:`vllm_laguna.model_executor.models.causal_lm`).
"""

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.mamba.mamba_utils import MambaStateCopyFuncCalculator
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.models.interfaces import HasInnerState, IsHybrid
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper

from vllm_laguna.model_executor.layers.attention_heads import RankHeads
from vllm_laguna.configs.lfm2 import Lfm2Arch, parse_lfm2_config
from vllm_laguna.model_executor.checkpoint import CheckpointAudit, CheckpointError
from vllm_laguna.model_executor.layers.short_conv import ShortConv, conv_state_dtype, conv_state_shape
from vllm_laguna.model_executor.layers.swiglu import SwiGLU
from vllm_laguna.model_executor.models.causal_lm import CausalLM, DecoderModel, PreNormDecoderLayer


class Lfm2Attention(nn.Module):
    """GQA with RMSNorm over head_dim on q and k (``q_layernorm``/``k_layernorm``) before
    neox-style RoPE; scale head_dim^-0.5. Shapes on one rank: q ``[T, H_local * D]``,
    k/v ``[T, KV_local * D]``."""

    def __init__(self, vllm_config: VllmConfig, arch: Lfm2Arch, prefix: str):
        super().__init__()
        quant_config = vllm_config.quant_config
        self.heads = RankHeads.for_this_rank(arch.num_heads, arch.num_kv_heads, arch.head_dim)
        self.head_dim = arch.head_dim
        self.qkv_proj = QKVParallelLinear(
            arch.hidden_size,
            arch.head_dim,
            arch.num_heads,
            arch.num_kv_heads,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj",
        )
        self.out_proj = RowParallelLinear(
            arch.num_heads * arch.head_dim,
            arch.hidden_size,
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.out_proj",
        )
        self.q_layernorm = RMSNorm(arch.head_dim, eps=arch.norm_eps)
        self.k_layernorm = RMSNorm(arch.head_dim, eps=arch.norm_eps)
        self.rotary_emb = get_rope(
            arch.head_dim,
            max_position=arch.max_position_embeddings,
            is_neox_style=True,
            rope_parameters=arch.rope,
        )
        self.attn = Attention(
            self.heads.num_heads,
            arch.head_dim,
            arch.head_dim**-0.5,
            num_kv_heads=self.heads.num_kv_heads,
            cache_config=vllm_config.cache_config,
            quant_config=quant_config,
            prefix=f"{prefix}.attn",
        )

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = self.heads.split_qkv(qkv)
        q = self.q_layernorm(q.reshape(-1, self.heads.num_heads, self.head_dim)).view(q.shape)
        k = self.k_layernorm(k.reshape(-1, self.heads.num_kv_heads, self.head_dim)).view(k.shape)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.out_proj(self.attn(q, k, v))
        return out


class Lfm2DecoderLayer(PreNormDecoderLayer):
    norm_names = ("operator_norm", "ffn_norm")
    ffn_name = "feed_forward"

    def __init__(self, vllm_config: VllmConfig, arch: Lfm2Arch, layer: int, prefix: str):
        super().__init__()
        self.is_conv = arch.is_conv(layer)
        if self.is_conv:
            self.conv = ShortConv(
                arch,
                vllm_config.model_config,
                vllm_config.cache_config,
                vllm_config.quant_config,
                prefix=f"{prefix}.conv",
            )
        else:
            self.self_attn = Lfm2Attention(vllm_config, arch, prefix=f"{prefix}.self_attn")
        self.feed_forward = SwiGLU(
            arch.hidden_size, arch.ff_dim, vllm_config.quant_config, prefix=f"{prefix}.feed_forward"
        )
        self.operator_norm = RMSNorm(arch.hidden_size, eps=arch.norm_eps)
        self.ffn_norm = RMSNorm(arch.hidden_size, eps=arch.norm_eps)

    def mix(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(hidden_states) if self.is_conv else self.self_attn(positions, hidden_states)


@support_torch_compile
class Lfm2Model(DecoderModel):
    """The final norm is the checkpoint's ``embedding_norm`` (loaded as ``norm``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        arch = parse_lfm2_config(vllm_config.model_config.hf_text_config)
        super().__init__(
            arch, lambda i, p: Lfm2DecoderLayer(vllm_config, arch, i, prefix=p), arch.norm_eps, prefix
        )


class Lfm2ForCausalLM(CausalLM, HasInnerState, IsHybrid):
    """vLLM entry point for ``Lfm2ForCausalLM`` checkpoints (either config form).

    Prefix caching works (vLLM's "align" mode: the conv state at every 128-token block
    boundary is kept with the block and copied by :meth:`get_mamba_state_copy_func`'s spec).
    ``IsHybrid`` is what asks for that copy spec, in vLLM 0.32 and 0.33 alike; the
    ``SupportsMambaPrefixCaching`` marker is only for attention-free models (0.32 read its
    flag nowhere, 0.33 dropped it).
    """

    model_cls = Lfm2Model
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "gate_up_proj": ["w1", "w3"],
    }
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={
            "model.embedding_norm.": "model.norm.",
            ".feed_forward.w2.": ".feed_forward.down_proj.",
        },
        orig_to_new_stacked={
            ".self_attn.q_proj": (".self_attn.qkv_proj", "q"),
            ".self_attn.k_proj": (".self_attn.qkv_proj", "k"),
            ".self_attn.v_proj": (".self_attn.qkv_proj", "v"),
            ".feed_forward.w1.": (".feed_forward.gate_up_proj.", 0),
            ".feed_forward.w3.": (".feed_forward.gate_up_proj.", 1),
        },
    )

    # -- IsHybrid: what vLLM sizes the state cache by, before the model exists ------------

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig) -> tuple[tuple[int, ...], ...]:
        arch = parse_lfm2_config(vllm_config.model_config.hf_text_config)
        return conv_state_shape(arch, vllm_config.parallel_config.tensor_parallel_size)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig) -> tuple[torch.dtype, ...]:
        return conv_state_dtype(vllm_config.model_config, vllm_config.cache_config)

    @classmethod
    def get_mamba_state_copy_func(cls):
        """How vLLM copies a conv state between blocks (prefix caching's align mode)."""
        return MambaStateCopyFuncCalculator.short_conv_state_copy_func()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        arch = self.model.arch
        audit = CheckpointAudit(lfm2_checkpoint_keys(arch))
        loader = AutoWeightsLoader(self)
        loaded = loader.load_weights(audit.watch(_conv_biases_checked(arch, weights)), mapper=self.hf_to_vllm_mapper)
        audit.raise_if_incomplete()
        return loaded


def _conv_biases_checked(
    arch: Lfm2Arch, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """A conv-block bias in a checkpoint whose config says ``conv_bias: false`` is an error
    (vLLM's loader would drop it silently)."""
    for name, tensor in weights:
        if ".conv." in name and name.endswith(".bias") and not arch.conv_bias:
            raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint: the config says conv_bias: false")
        yield name, tensor


def lfm2_checkpoint_keys(arch: Lfm2Arch) -> CheckpointAudit.Spec:
    """What a complete LFM2 checkpoint holds (see CheckpointAudit)."""
    spec = CheckpointAudit.Spec()
    spec.require("model.embed_tokens.weight", "model.embedding_norm.weight")
    if not arch.tie_word_embeddings:
        spec.require("lm_head.weight")
    for i in range(arch.num_layers):
        p = f"model.layers.{i}"
        spec.require(f"{p}.operator_norm.weight", f"{p}.ffn_norm.weight")
        spec.require(*(f"{p}.feed_forward.{w}.weight" for w in ("w1", "w2", "w3")))
        if arch.is_conv(i):
            names = ("in_proj", "conv", "out_proj")
            spec.require(*(f"{p}.conv.{n}.weight" for n in names))
            if arch.conv_bias:
                spec.require(*(f"{p}.conv.{n}.bias" for n in names))
        else:
            spec.require(*(f"{p}.self_attn.{n}_proj.weight" for n in ("q", "k", "v", "out")))
            spec.require(f"{p}.self_attn.q_layernorm.weight", f"{p}.self_attn.k_layernorm.weight")
    return spec
