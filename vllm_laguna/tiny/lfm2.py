"""Tiny LFM2 checkpoints with random weights, in the layout LiquidAI's Hub checkpoints use.

Tensor names are transformers' module names (the Hub checkpoints use the same ones; LFM2 has
no conversion mapping): ``model.layers.{i}.conv.{in_proj,conv,out_proj}.*`` on conv layers,
``model.layers.{i}.self_attn.{q,k,v,out}_proj.weight`` and ``self_attn.{q,k}_layernorm.weight``
on attention layers, ``feed_forward.{w1,w3,w2}.weight``, ``operator_norm``/``ffn_norm``, and
the final ``model.embedding_norm.weight``. The depthwise conv weight is stored as
``nn.Conv1d`` keeps it, ``[hidden, 1, conv_L_cache]``. Embeddings are tied unless asked
otherwise (then ``lm_head.weight`` is written).

Two ``config.json`` forms are written:

* ``v5``: what transformers v5 writes: ``layer_types``, ``rope_parameters``,
  ``tie_word_embeddings``, ``intermediate_size``; no ``conv_dim``/``block_dim``/``block_ff_dim``.
* ``hub``: the older form of LiquidAI's first Hub releases: ``full_attn_idxs`` instead of
  ``layer_types``, ``block_ff_dim`` (which transformers reads as ``intermediate_size``),
  ``conv_dim``/``conv_dim_out``/``block_dim`` equal to ``hidden_size``, ``tie_embedding``,
  ``rope_theta``, ``num_heads`` and the training-only ``block_*`` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_laguna.tiny.tokenizer import build_tokenizer
from vllm_laguna.tiny.weights import RandomWeights, save_checkpoint

CONFIG_FORMS = ("v5", "hub")


@dataclass
class Lfm2Tiny:
    """Options of a tiny LFM2 checkpoint.

    Sizes respect vLLM's CPU backend (head_dim 32) and tensor parallelism 2 (even head,
    hidden and feed-forward sizes).
    """

    num_layers: int = 6
    hidden_size: int = 64
    num_heads: int = 2
    num_kv_heads: int = 1
    #: written to config.json only when set (transformers then uses it for head size)
    head_dim: int | None = None
    layer_types: list[str] = field(
        default_factory=lambda: ["conv", "conv", "full_attention", "conv", "full_attention", "conv"]
    )
    intermediate_size: int = 192
    block_auto_adjust_ff_dim: bool = True
    block_ffn_dim_multiplier: float | None = 1.0
    block_multiple_of: int = 32
    conv_L_cache: int = 3
    conv_bias: bool = False
    #: neither is the config parser's default (1e-5, 1e6): a model ignoring them fails parity
    norm_eps: float = 1e-4
    rope_theta: float = 250_000.0
    max_position_embeddings: int = 4096
    vocab_size: int = 512
    weight_std: float = 0.08
    dtype: str = "float32"
    config_form: str = "v5"
    tie_word_embeddings: bool = True
    seed: int = 0
    #: extra or overriding config.json entries (e.g. to write a malformed config)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str) -> Lfm2Tiny:
        """``default``: the tiny test model; ``hub``: the same in the older Hub config form;
        ``lfm2-350m-scaled``: LFM2-350M's structure at 1/2 width (benchmarks)."""
        if name == "default":
            return cls()
        if name == "hub":
            return cls(config_form="hub")
        if name == "lfm2-350m-scaled":
            pattern = ["conv", "conv", "full_attention"] * 5 + ["conv"]
            return cls(
                num_layers=16,
                hidden_size=512,
                num_heads=8,
                num_kv_heads=4,
                layer_types=pattern,
                intermediate_size=3328,
                block_multiple_of=256,
                vocab_size=32768,
                dtype="bfloat16",
                weight_std=0.02,
            )
        raise ValueError(f"unknown LFM2 preset {name!r}: expected 'default', 'hub' or 'lfm2-350m-scaled'")

    @property
    def ff_dim(self) -> int:
        """The SwiGLU width transformers builds from these options."""
        width = self.intermediate_size
        if self.block_auto_adjust_ff_dim:
            width = int(2 * width / 3)
            if self.block_ffn_dim_multiplier is not None:
                width = int(self.block_ffn_dim_multiplier * width)
                width = self.block_multiple_of * (-(-width // self.block_multiple_of))
        return width

    def config(self) -> dict[str, Any]:
        if self.config_form not in CONFIG_FORMS:
            raise ValueError(f"unknown config_form {self.config_form!r}: expected one of {CONFIG_FORMS}")
        cfg: dict[str, Any] = {
            "architectures": ["Lfm2ForCausalLM"],
            "model_type": "lfm2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "norm_eps": self.norm_eps,
            "conv_bias": self.conv_bias,
            "conv_L_cache": self.conv_L_cache,
            "block_multiple_of": self.block_multiple_of,
            "block_ffn_dim_multiplier": self.block_ffn_dim_multiplier,
            "block_auto_adjust_ff_dim": self.block_auto_adjust_ff_dim,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "dtype": self.dtype,
        }
        if self.head_dim is not None:
            cfg["head_dim"] = self.head_dim
        if self.config_form == "v5":
            cfg.update(
                intermediate_size=self.intermediate_size,
                layer_types=list(self.layer_types),
                rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
                tie_word_embeddings=self.tie_word_embeddings,
            )
        else:
            cfg.update(
                block_ff_dim=self.intermediate_size,
                intermediate_size=self.intermediate_size,
                full_attn_idxs=[i for i, t in enumerate(self.layer_types) if t == "full_attention"],
                conv_dim=self.hidden_size,
                conv_dim_out=self.hidden_size,
                block_dim=self.hidden_size,
                num_heads=self.num_heads,
                rope_theta=self.rope_theta,
                tie_embedding=self.tie_word_embeddings,
                block_norm_eps=self.norm_eps,
                block_use_swiglu=True,
                block_mlp_init_scale=1.0,
                block_out_init_scale=1.0,
                conv_use_xavier_init=True,
                use_pos_enc=True,
                torch_dtype=self.dtype,
            )
            del cfg["dtype"]
        cfg.update(self.config_overrides)
        return cfg

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Random weights named as in LiquidAI's Hub checkpoints."""
        w = RandomWeights(self.seed, self.weight_std)
        H, F = self.hidden_size, self.ff_dim
        D = self.head_dim or H // self.num_heads
        sd = {"model.embed_tokens.weight": w.normal(self.vocab_size, H)}
        for i, layer_type in enumerate(self.layer_types):
            p = f"model.layers.{i}"
            sd[f"{p}.operator_norm.weight"] = w.norm(H)
            sd[f"{p}.ffn_norm.weight"] = w.norm(H)
            if layer_type == "conv":
                sd[f"{p}.conv.in_proj.weight"] = w.normal(3 * H, H)
                # a depthwise kernel of O(1) taps, so the conv matters as much as the gates
                sd[f"{p}.conv.conv.weight"] = w.normal(H, 1, self.conv_L_cache, std=0.5)
                sd[f"{p}.conv.out_proj.weight"] = w.normal(H, H)
                if self.conv_bias:
                    sd[f"{p}.conv.in_proj.bias"] = w.normal(3 * H, std=0.3)
                    sd[f"{p}.conv.conv.bias"] = w.normal(H, std=0.3)
                    sd[f"{p}.conv.out_proj.bias"] = w.normal(H, std=0.3)
            else:
                sd[f"{p}.self_attn.q_proj.weight"] = w.normal(self.num_heads * D, H)
                sd[f"{p}.self_attn.k_proj.weight"] = w.normal(self.num_kv_heads * D, H)
                sd[f"{p}.self_attn.v_proj.weight"] = w.normal(self.num_kv_heads * D, H)
                sd[f"{p}.self_attn.out_proj.weight"] = w.normal(H, self.num_heads * D)
                sd[f"{p}.self_attn.q_layernorm.weight"] = w.norm(D)
                sd[f"{p}.self_attn.k_layernorm.weight"] = w.norm(D)
            sd[f"{p}.feed_forward.w1.weight"] = w.normal(F, H)
            sd[f"{p}.feed_forward.w3.weight"] = w.normal(F, H)
            sd[f"{p}.feed_forward.w2.weight"] = w.normal(H, F)
        sd["model.embedding_norm.weight"] = w.norm(H)
        if not self.tie_word_embeddings:
            sd["lm_head.weight"] = w.normal(self.vocab_size, H)
        dtype = getattr(torch, self.dtype)
        return {k: v.to(dtype) for k, v in sd.items()}


def build_lfm2(out_dir: str | Path, spec: Lfm2Tiny | None = None, **options: Any) -> Path:
    """Write a tiny LFM2 checkpoint (config, weights, tokenizer, chat template) to ``out_dir``.

    ``options`` override fields of ``spec`` (default :class:`Lfm2Tiny`).
    """
    spec = dataclasses.replace(spec or Lfm2Tiny(), **options)
    out = Path(out_dir)
    save_checkpoint(out, spec.config(), spec.state_dict(), generation={"eos_token_id": 2})
    build_tokenizer(out, vocab_size=min(spec.vocab_size, 512))
    return out
