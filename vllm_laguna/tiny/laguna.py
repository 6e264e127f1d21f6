"""Tiny Laguna checkpoints with random weights, in the layouts real checkpoints use on disk.

``hub`` is the layout of poolside's Hub checkpoints (per-expert tensors,
``mlp.experts.e_score_correction_bias``, ``mlp.shared_expert.*``); ``transformers`` holds the
names of transformers' own module tree (fused ``experts.gate_up_proj`` [E, 2I, H] and
``experts.down_proj`` [E, H, I], ``mlp.gate.e_score_correction_bias``,
``mlp.shared_experts.*``), as ``save_pretrained`` of several transformers 5.x releases writes
them (5.19 converts back to the Hub names on save). It is produced by loading the Hub layout
into transformers and saving its state dict.
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_laguna.tiny.tokenizer import build_tokenizer
from vllm_laguna.tiny.weights import RandomWeights, save_checkpoint


def _default_rope() -> dict[str, Any]:
    return {
        "full_attention": {
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 32.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 64.0,
            "beta_slow": 1.0,
            "attention_factor": 1.0,
            "partial_rotary_factor": 0.5,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    }


@dataclass
class LagunaTiny:
    """Options of a tiny Laguna checkpoint; defaults exercise every Laguna feature.

    Sizes respect vLLM's CPU backend: head_dim in {32, 64, ...}, hidden and expert
    widths multiples of 32.
    """

    num_layers: int = 4
    hidden_size: int = 64
    head_dim: int = 32
    num_kv_heads: int = 2
    heads_per_layer: list[int] = field(default_factory=lambda: [4, 8, 8, 8])
    layer_types: list[str] = field(
        default_factory=lambda: ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    )
    sliding_window: int = 16
    rope_parameters: dict[str, Any] = field(default_factory=_default_rope)
    max_position_embeddings: int = 4096
    mlp_layer_types: list[str] = field(default_factory=lambda: ["dense", "sparse", "sparse", "sparse"])
    intermediate_size: int = 96
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 32
    shared_expert_intermediate_size: int = 32
    routed_scaling_factor: float = 2.5
    router_softcap: float = 0.0
    #: `moe_router_score_func`; written to config.json only when not "sigmoid" (released
    #: checkpoints have no such key)
    router_score_func: str = "sigmoid"
    #: std of the e_score_correction_bias; large enough to change which experts win
    bias_std: float = 0.1
    #: what config.json says: "per-head", "per-element", True (per-head weights, as
    #: transformers reads it) or False (no g_proj)
    gating: Any = "per-head"
    #: per-layer gate kinds written as config.json's `gating_types` (they decide the
    #: weights' shapes); None writes no such key
    gating_types: list[str] | None = None
    #: `swa_attention_sink_enabled`: sliding layers get a per-head `self_attn.sink`
    swa_attention_sink: bool = False
    #: std of the sink logits (around 0: each sink weighs about one key's worth)
    sink_std: float = 1.0
    #: not the config parsers' default (1e-6): a model ignoring it fails the parity tests
    rms_norm_eps: float = 1e-4
    vocab_size: int = 512
    weight_std: float = 0.08
    dtype: str = "float32"
    layout: str = "hub"
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    seed: int = 0
    #: extra or overriding config.json entries (e.g. to write a malformed config)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str) -> LagunaTiny:
        """``default``: the tiny test model; ``xs2-scaled``: the benchmark model of
        ``benchmarks/cpu.py``, Laguna-XS.2's structure at 1/4 width and 1/5 depth.

        ``xs2-scaled`` keeps XS.2's head_dim (128), layer pattern (full, sliding x3), window
        (512), layer-0 dense MLP at 4x hidden, expert and shared-expert width at hidden/4,
        top-8 routing, KV width hidden/2 and the (full : sliding) query-width ordering; it
        scales hidden 2048 -> 512, 40 -> 8 layers, 48/64 -> 8/16 query heads (GQA 4/8),
        256 -> 64 experts and the vocabulary 100352 -> 32768. Attention and the active
        experts stay about equal in weight per layer, as in XS.2. 143M parameters; a batch-1
        decode step reads ~99 MB of bf16 weights (34 MB of them the LM head).
        """
        if name == "default":
            return cls()
        if name == "xs2-scaled":
            pattern = ["full_attention"] + ["sliding_attention"] * 3
            rope = _default_rope()
            rope["full_attention"]["original_max_position_embeddings"] = 4096
            return cls(
                num_layers=8,
                hidden_size=512,
                head_dim=128,
                num_kv_heads=2,
                heads_per_layer=[8 if t == "full_attention" else 16 for t in pattern * 2],
                layer_types=pattern * 2,
                sliding_window=512,
                rope_parameters=rope,
                max_position_embeddings=131072,
                mlp_layer_types=["dense"] + ["sparse"] * 7,
                intermediate_size=2048,
                num_experts=64,
                top_k=8,
                moe_intermediate_size=128,
                shared_expert_intermediate_size=128,
                vocab_size=32768,
                dtype="bfloat16",
                weight_std=0.02,
            )
        raise ValueError(f"unknown Laguna preset {name!r}: expected 'default' or 'xs2-scaled'")

    def config(self) -> dict[str, Any]:
        cfg = {
            "architectures": ["LagunaForCausalLM"],
            "model_type": "laguna",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": max(self.heads_per_layer),
            "num_attention_heads_per_layer": list(self.heads_per_layer),
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": self.rope_parameters,
            "max_position_embeddings": self.max_position_embeddings,
            "mlp_layer_types": list(self.mlp_layer_types),
            "num_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "moe_intermediate_size": self.moe_intermediate_size,
            "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
            "moe_routed_scaling_factor": self.routed_scaling_factor,
            "moe_router_logit_softcapping": self.router_softcap,
            "moe_apply_router_weight_on_input": False,
            "gating": self.gating,
            "swa_attention_sink_enabled": self.swa_attention_sink,
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 2,
            "eos_token_id": [2, 24],
            "pad_token_id": 0,
            "dtype": self.dtype,
        }
        if self.gating_types is not None:
            cfg["gating_types"] = list(self.gating_types)
        if self.router_score_func != "sigmoid":
            cfg["moe_router_score_func"] = self.router_score_func
        cfg.update(self.config_overrides)
        return cfg

    def per_element_gate(self, layer: int) -> bool:
        """Whether the weights give ``layer`` a per-element gate (else per-head)."""
        if self.gating_types is not None:
            return self.gating_types[layer] == "per-element"
        return self.gating == "per-element"

    def hub_state_dict(self) -> dict[str, torch.Tensor]:
        """Random weights named as in poolside's Hub checkpoints."""
        w = RandomWeights(self.seed, self.weight_std)
        H, D = self.hidden_size, self.head_dim
        sd = {"model.embed_tokens.weight": w.normal(self.vocab_size, H), "model.norm.weight": w.norm(H)}
        if not self.tie_word_embeddings:
            sd["lm_head.weight"] = w.normal(self.vocab_size, H)
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            heads = self.heads_per_layer[i]
            sd[f"{p}.input_layernorm.weight"] = w.norm(H)
            sd[f"{p}.post_attention_layernorm.weight"] = w.norm(H)
            sd[f"{p}.self_attn.q_proj.weight"] = w.normal(heads * D, H)
            sd[f"{p}.self_attn.k_proj.weight"] = w.normal(self.num_kv_heads * D, H)
            sd[f"{p}.self_attn.v_proj.weight"] = w.normal(self.num_kv_heads * D, H)
            sd[f"{p}.self_attn.o_proj.weight"] = w.normal(H, heads * D)
            sd[f"{p}.self_attn.q_norm.weight"] = w.norm(D)
            sd[f"{p}.self_attn.k_norm.weight"] = w.norm(D)
            if self.attention_bias:
                for n, width in (("q", heads * D), ("k", self.num_kv_heads * D), ("v", self.num_kv_heads * D), ("o", H)):
                    sd[f"{p}.self_attn.{n}_proj.bias"] = w.normal(width)
            if self.gating is not False:
                sd[f"{p}.self_attn.g_proj.weight"] = w.normal(heads * D if self.per_element_gate(i) else heads, H)
            if self.swa_attention_sink and self.layer_types[i] == "sliding_attention":
                sd[f"{p}.self_attn.sink"] = w.normal(heads, std=self.sink_std)
            if self.mlp_layer_types[i] == "dense":
                sd.update(_swiglu(w, f"{p}.mlp", H, self.intermediate_size))
                continue
            E, I = self.num_experts, self.moe_intermediate_size
            sd[f"{p}.mlp.gate.weight"] = w.normal(E, H)
            sd[f"{p}.mlp.experts.e_score_correction_bias"] = w.normal(E, std=self.bias_std).float()
            for e in range(E):
                sd.update(_swiglu(w, f"{p}.mlp.experts.{e}", H, I))
            if self.shared_expert_intermediate_size:
                sd.update(_swiglu(w, f"{p}.mlp.shared_expert", H, self.shared_expert_intermediate_size))
        dtype = getattr(torch, self.dtype)
        return {k: v if k.endswith("e_score_correction_bias") else v.to(dtype) for k, v in sd.items()}


def _swiglu(w: RandomWeights, prefix: str, hidden: int, inner: int) -> dict[str, torch.Tensor]:
    return {
        f"{prefix}.gate_proj.weight": w.normal(inner, hidden),
        f"{prefix}.up_proj.weight": w.normal(inner, hidden),
        f"{prefix}.down_proj.weight": w.normal(hidden, inner),
    }


def build_laguna(out_dir: str | Path, spec: LagunaTiny | None = None, **options: Any) -> Path:
    """Write a tiny Laguna checkpoint (config, weights, tokenizer, chat template) to ``out_dir``.

    ``options`` override fields of ``spec`` (default :class:`LagunaTiny`).
    """
    spec = dataclasses.replace(spec or LagunaTiny(), **options)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if spec.layout == "hub":
        save_checkpoint(out, spec.config(), spec.hub_state_dict(), generation={"eos_token_id": [2, 24]})
    elif spec.layout == "transformers":
        _save_via_transformers(out, spec)
    else:
        raise ValueError(f"unknown layout {spec.layout!r}: expected 'hub' or 'transformers'")
    build_tokenizer(out, vocab_size=min(spec.vocab_size, 512))
    return out


def _save_via_transformers(out: Path, spec: LagunaTiny) -> None:
    from transformers import AutoModelForCausalLM

    hub = spec.hub_state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), spec.config(), hub, generation={"eos_token_id": [2, 24]})
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, spec.dtype))
    state = model.state_dict()
    # transformers has no attention sink: the sinks keep their (only) name
    state.update({name: tensor for name, tensor in hub.items() if name.endswith(".self_attn.sink")})
    save_checkpoint(out, spec.config(), state, generation={"eos_token_id": [2, 24]})


#: an otherwise unused id of the tiny tokenizer (a reserved filler) for DFlash's mask token
DFLASH_MASK_TOKEN_ID = 31


@dataclass
class LagunaDFlashTiny:
    """Options of a tiny DFlash drafter for a tiny Laguna target, in the layout of poolside's
    ``Laguna-*-DFlash`` checkpoints, which vLLM serves as ``DFlashLagunaForCausalLM``.

    The drafter is a small Laguna decoder: every layer ``sliding_attention`` with a per-head
    output gate and a dense SwiGLU. It has no embedding and no LM head of its own (it shares
    the target's), and reads the target's residual stream after each layer of
    ``dflash_config.target_layer_ids``: each captured slice is RMS-normed
    (``aux_hidden_norms.{j}``), the concatenation projected by ``fc`` [H, n_aux * H] and normed
    (``hidden_norm``). Tensor names carry no ``model.`` prefix; ``qkv_proj`` is stored fused.
    ``config.json`` repeats the capture points as ``eagle_aux_hidden_state_layer_ids``
    (target_layer_ids + 1, the index of the layer whose input the capture is).
    """

    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 96
    sliding_window: int = 16
    rope_parameters: dict[str, Any] = field(
        default_factory=lambda: {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    )
    #: target layers whose output the drafter reads (one per drafter layer, as published)
    target_layer_ids: list[int] = field(default_factory=lambda: [0, 2])
    #: DFlash block: the anchor token and block_size - 1 masked positions
    block_size: int = 4
    mask_token_id: int = DFLASH_MASK_TOKEN_ID
    weight_std: float = 0.08
    dtype: str = "float32"
    seed: int = 1

    def config(self, target: LagunaTiny) -> dict[str, Any]:
        n = self.num_layers
        return {
            "architectures": ["DFlashLagunaForCausalLM"],
            "model_type": "laguna",
            "vocab_size": target.vocab_size,
            "draft_vocab_size": target.vocab_size,
            "hidden_size": target.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": n,
            "num_attention_heads": self.num_heads,
            "num_attention_heads_per_layer": [self.num_heads] * n,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "layer_types": ["sliding_attention"] * n,
            "sliding_window": self.sliding_window,
            "mlp_layer_types": ["dense"] * n,
            "gating": "per-head",
            "rope_theta": 10000.0,
            "rope_parameters": self.rope_parameters,
            "max_position_embeddings": target.max_position_embeddings,
            "rms_norm_eps": 1e-6,
            "attention_bias": False,
            "tie_word_embeddings": False,
            "eagle_aux_hidden_state_layer_ids": [i + 1 for i in self.target_layer_ids],
            "dflash_config": {
                "block_size": self.block_size,
                "mask_token_id": self.mask_token_id,
                "target_layer_ids": list(self.target_layer_ids),
                "num_target_layers": target.num_layers,
                "causal": True,
            },
            "dtype": self.dtype,
        }

    def state_dict(self, target: LagunaTiny) -> dict[str, torch.Tensor]:
        w = RandomWeights(self.seed, self.weight_std)
        H, D = target.hidden_size, self.head_dim
        qkv_rows = (self.num_heads + 2 * self.num_kv_heads) * D
        sd = {
            "fc.weight": w.normal(H, len(self.target_layer_ids) * H),
            "hidden_norm.weight": w.norm(H),
            "norm.weight": w.norm(H),
        }
        for j in range(len(self.target_layer_ids)):
            sd[f"aux_hidden_norms.{j}.weight"] = w.norm(H)
        for i in range(self.num_layers):
            p = f"layers.{i}"
            sd[f"{p}.input_layernorm.weight"] = w.norm(H)
            sd[f"{p}.post_attention_layernorm.weight"] = w.norm(H)
            sd[f"{p}.self_attn.qkv_proj.weight"] = w.normal(qkv_rows, H)
            sd[f"{p}.self_attn.o_proj.weight"] = w.normal(H, self.num_heads * D)
            sd[f"{p}.self_attn.g_proj.weight"] = w.normal(self.num_heads, H)
            sd[f"{p}.self_attn.q_norm.weight"] = w.norm(D)
            sd[f"{p}.self_attn.k_norm.weight"] = w.norm(D)
            sd.update(_swiglu(w, f"{p}.mlp", H, self.intermediate_size))
        dtype = getattr(torch, self.dtype)
        return {k: v.to(dtype) for k, v in sd.items()}


def build_laguna_dflash(
    out_dir: str | Path,
    target: LagunaTiny | None = None,
    spec: LagunaDFlashTiny | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    **options: Any,
) -> Path:
    """Write a tiny DFlash drafter checkpoint for the target ``target`` (default
    :class:`LagunaTiny`) to ``out_dir``: random weights, or ``state_dict``; ``options``
    override fields of ``spec``."""
    target = target or LagunaTiny()
    spec = dataclasses.replace(spec or LagunaDFlashTiny(), **options)
    bad = [i for i in spec.target_layer_ids if not 0 <= i < target.num_layers]
    if len(spec.target_layer_ids) != spec.num_layers or bad:
        raise ValueError(
            f"target_layer_ids: expected {spec.num_layers} target layer indices in [0, {target.num_layers}) "
            f"(got {spec.target_layer_ids})"
        )
    out = Path(out_dir)
    save_checkpoint(out, spec.config(target), spec.state_dict(target) if state_dict is None else state_dict)
    return out
