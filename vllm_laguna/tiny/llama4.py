"""Tiny Llama 4 text checkpoints with random weights, in the layouts real checkpoints use.

``layout="text"``: a ``Llama4ForCausalLM`` checkpoint (``model_type: llama4_text``), names
as transformers writes them: ``model.layers.{i}.self_attn.{q,k,v,o}_proj``,
``feed_forward.router``, fused experts ``feed_forward.experts.gate_up_proj`` [E, H, 2I]
(gate columns first) and ``feed_forward.experts.down_proj`` [E, I, H], applied as
``x @ W``, ``feed_forward.shared_expert.*``, dense ``feed_forward.{gate,up,down}_proj``.

``layout="multimodal"``: a ``Llama4ForConditionalGeneration`` checkpoint as Meta publishes
them: a ``Llama4Config`` with the text config under ``text_config`` and a (tiny)
``vision_config``; the text tower's tensors under ``language_model.``, plus a few
``vision_model.*`` / ``multi_modal_projector.*`` tensors that a text-only model must skip.

``expert_layout="per-expert"`` writes ``feed_forward.experts.{e}.{gate,up,down}_proj.weight``
([I, H], [I, H], [H, I]) instead of the fused tensors: the layout of quantized Llama 4
checkpoints (compressed-tensors, FP8), which transformers cannot read.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from vllm_laguna.tiny.tokenizer import build_tokenizer
from vllm_laguna.tiny.weights import RandomWeights, save_checkpoint

LAYOUTS = ("text", "multimodal")
EXPERT_LAYOUTS = ("fused", "per-expert")


def _llama3_rope() -> dict[str, Any]:
    """Llama 3 scaling whose three frequency bands (kept, smoothed, scaled) all occur at
    head_dim 32 / theta 1e6: wavelengths below 64 are kept, above 256 divided by 8."""
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256,
    }


def _tiny_vision_config() -> dict[str, Any]:
    return {
        "model_type": "llama4_vision_model",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 28,
        "patch_size": 14,
        "vision_output_dim": 64,
        "projector_input_dim": 64,
        "projector_output_dim": 64,
        "pixel_shuffle_ratio": 0.5,
    }


@dataclass
class Llama4Tiny:
    """Options of a tiny Llama 4 text checkpoint; defaults exercise every text feature.

    Default: 4 layers, RoPE/NoPE alternating (``no_rope_layers: []`` + interval 2, Scout's
    form), chunk 128 (the CPU block size) on RoPE layers, q/k norm, temperature tuning from
    position 15 on (``floor_scale`` 16), MoE on layers 1 and 3 (step 2) with a shared expert,
    dense layers 0 and 2, Llama 3 RoPE scaling. Sizes respect vLLM's CPU backend: head_dim
    in {32, 64, ...}, hidden and expert widths multiples of 32.
    """

    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    #: written as is; [] lets the config derive them from no_rope_layer_interval
    no_rope_layers: list[int] = field(default_factory=list)
    no_rope_layer_interval: int = 2
    #: written when set; None lets the config derive them (chunked on RoPE layers)
    layer_types: list[str] | None = None
    attention_chunk_size: int = 128
    use_qk_norm: bool = True
    attn_temperature_tuning: bool = True
    floor_scale: int = 16
    #: this, rope_theta and rms_norm_eps are not the config parser's defaults (0.1, 5e5,
    #: 1e-5): a model ignoring one fails the parity tests
    attn_scale: float = 0.25
    interleave_moe_layer_step: int = 2
    #: written when set; None lets the config derive them from the interleave step
    moe_layers: list[int] | None = None
    num_experts: int = 8
    top_k: int = 1
    intermediate_size: int = 32
    intermediate_size_mlp: int = 96
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = field(default_factory=_llama3_rope)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-4
    vocab_size: int = 512
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    weight_std: float = 0.08
    dtype: str = "float32"
    layout: str = "text"
    expert_layout: str = "fused"
    seed: int = 0
    #: extra or overriding text-config entries (e.g. to write a malformed config)
    config_overrides: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def preset(cls, name: str) -> Llama4Tiny:
        """``default``: the tiny test model; ``scout-scaled``: Llama-4-Scout's text structure
        (every layer MoE, 16 experts top-1, NoPE every 4th layer, chunk 8192, temperature
        tuning from 8192 tokens) at 1/5 width and 1/6 depth, bf16 (benchmarks)."""
        if name == "default":
            return cls()
        if name == "scout-scaled":
            return cls(
                num_layers=8,
                hidden_size=1024,
                num_heads=8,
                num_kv_heads=2,
                head_dim=128,
                no_rope_layer_interval=4,
                attention_chunk_size=8192,
                floor_scale=8192,
                interleave_moe_layer_step=1,
                num_experts=16,
                intermediate_size=1024,
                intermediate_size_mlp=2048,
                rope_scaling={
                    "rope_type": "llama3",
                    "factor": 16.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 1.0,
                    "original_max_position_embeddings": 8192,
                },
                max_position_embeddings=65536,
                vocab_size=32768,
                weight_std=0.02,
                dtype="bfloat16",
            )
        raise ValueError(f"unknown Llama 4 preset {name!r}: expected 'default' or 'scout-scaled'")

    def text_config(self) -> dict[str, Any]:
        cfg = {
            "architectures": ["Llama4ForCausalLM"],
            "model_type": "llama4_text",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "intermediate_size_mlp": self.intermediate_size_mlp,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "no_rope_layers": list(self.no_rope_layers),
            "no_rope_layer_interval": self.no_rope_layer_interval,
            "attention_chunk_size": self.attention_chunk_size,
            "use_qk_norm": self.use_qk_norm,
            "attn_temperature_tuning": self.attn_temperature_tuning,
            "floor_scale": self.floor_scale,
            "attn_scale": self.attn_scale,
            "interleave_moe_layer_step": self.interleave_moe_layer_step,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.top_k,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": 2,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "dtype": self.dtype,
        }
        if self.moe_layers is not None:
            cfg["moe_layers"] = list(self.moe_layers)
        if self.layer_types is not None:
            cfg["layer_types"] = list(self.layer_types)
        cfg.update(self.config_overrides)
        return cfg

    def config(self) -> dict[str, Any]:
        """``config.json`` of the chosen layout."""
        if self.layout == "text":
            return self.text_config()
        text = self.text_config()
        del text["architectures"]
        return {
            "architectures": ["Llama4ForConditionalGeneration"],
            "model_type": "llama4",
            "text_config": text,
            "vision_config": _tiny_vision_config(),
            "boi_token_index": 25,
            "eoi_token_index": 26,
            "image_token_index": 27,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
        }

    def moe_layer_indices(self) -> list[int]:
        if self.moe_layers is not None:
            return list(self.moe_layers)
        step = self.interleave_moe_layer_step
        return list(range(step - 1, self.num_layers, step))

    def text_state_dict(self) -> dict[str, torch.Tensor]:
        """Random weights of the text model, named as in a ``Llama4ForCausalLM`` checkpoint."""
        w = RandomWeights(self.seed, self.weight_std)
        H, D, E, I = self.hidden_size, self.head_dim, self.num_experts, self.intermediate_size
        sd = {"model.embed_tokens.weight": w.normal(self.vocab_size, H), "model.norm.weight": w.norm(H)}
        if not self.tie_word_embeddings:
            sd["lm_head.weight"] = w.normal(self.vocab_size, H)
        moe_layers = set(self.moe_layer_indices())
        for i in range(self.num_layers):
            p = f"model.layers.{i}"
            sd[f"{p}.input_layernorm.weight"] = w.norm(H)
            sd[f"{p}.post_attention_layernorm.weight"] = w.norm(H)
            widths = {"q": self.num_heads * D, "k": self.num_kv_heads * D, "v": self.num_kv_heads * D}
            for name, rows in widths.items():
                sd[f"{p}.self_attn.{name}_proj.weight"] = w.normal(rows, H)
            sd[f"{p}.self_attn.o_proj.weight"] = w.normal(H, self.num_heads * D)
            if self.attention_bias:
                for name, rows in {**widths, "o": H}.items():
                    sd[f"{p}.self_attn.{name}_proj.bias"] = w.normal(rows)
            if i not in moe_layers:
                sd.update(_swiglu(w, f"{p}.feed_forward", H, self.intermediate_size_mlp))
                continue
            sd[f"{p}.feed_forward.router.weight"] = w.normal(E, H)
            sd.update(self._experts(w, f"{p}.feed_forward.experts", H, I))
            sd.update(_swiglu(w, f"{p}.feed_forward.shared_expert", H, I))
        dtype = getattr(torch, self.dtype)
        return {k: v.to(dtype) for k, v in sd.items()}

    def _experts(self, w: RandomWeights, prefix: str, H: int, I: int) -> dict[str, torch.Tensor]:
        gate_up = w.normal(self.num_experts, H, 2 * I)  # x @ gate_up -> [gate | up]
        down = w.normal(self.num_experts, I, H)
        if self.expert_layout == "fused":
            return {f"{prefix}.gate_up_proj": gate_up, f"{prefix}.down_proj": down}
        sd = {}
        for e in range(self.num_experts):
            sd[f"{prefix}.{e}.gate_proj.weight"] = gate_up[e, :, :I].T.contiguous()
            sd[f"{prefix}.{e}.up_proj.weight"] = gate_up[e, :, I:].T.contiguous()
            sd[f"{prefix}.{e}.down_proj.weight"] = down[e].T.contiguous()
        return sd

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the chosen layout."""
        sd = self.text_state_dict()
        if self.layout == "text":
            return sd
        dtype = getattr(torch, self.dtype)
        w = RandomWeights(self.seed + 1, self.weight_std)
        vision = {  # a few tensors of the vision tower; the text model must skip them
            "vision_model.patch_embedding.linear.weight": w.normal(32, 3 * 14 * 14),
            "vision_model.class_embedding": w.normal(32),
            "vision_model.model.layers.0.self_attn.q_proj.weight": w.normal(32, 32),
            "multi_modal_projector.linear_1.weight": w.normal(self.hidden_size, 64),
        }
        sd = {f"language_model.{k}": v for k, v in sd.items()}
        sd.update({k: v.to(dtype) for k, v in vision.items()})
        return sd


def _swiglu(w: RandomWeights, prefix: str, hidden: int, inner: int) -> dict[str, torch.Tensor]:
    shapes = {"gate": (inner, hidden), "up": (inner, hidden), "down": (hidden, inner)}
    return {f"{prefix}.{name}_proj.weight": w.normal(*shape) for name, shape in shapes.items()}


def build_llama4(out_dir: str | Path, spec: Llama4Tiny | None = None, **options: Any) -> Path:
    """Write a tiny Llama 4 checkpoint (config, sharded weights, tokenizer) to ``out_dir``.

    ``options`` override fields of ``spec`` (default :class:`Llama4Tiny`).
    """
    spec = dataclasses.replace(spec or Llama4Tiny(), **options)
    if spec.layout not in LAYOUTS:
        raise ValueError(f"unknown layout {spec.layout!r}: expected one of {LAYOUTS}")
    if spec.expert_layout not in EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert_layout {spec.expert_layout!r}: expected one of {EXPERT_LAYOUTS}")
    out = Path(out_dir)
    save_checkpoint(out, spec.config(), spec.state_dict(), generation={"eos_token_id": 2})
    build_tokenizer(out, vocab_size=min(spec.vocab_size, 512))
    return out


#: one per-expert weight: ``{prefix}.{e}.{gate,up,down}_proj.weight``
PER_EXPERT_WEIGHT = re.compile(r"^(?P<prefix>.*\.feed_forward\.experts)\.(?P<expert>\d+)\.(?P<proj>gate|up|down)_proj\.weight$")


def fuse_experts(ckpt: str | Path) -> None:
    """Rewrite a checkpoint's per-expert tensors (``expert_layout="per-expert"``) as the fused
    ``gate_up_proj`` [E, H, 2I] and ``down_proj`` [E, I, H] transformers reads; other tensors
    and files stay as they are."""
    ckpt = Path(ckpt)
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_file(ckpt / shard))
    experts: dict[str, dict[tuple[int, str], torch.Tensor]] = defaultdict(dict)
    fused = {}
    for name, tensor in tensors.items():
        if match := PER_EXPERT_WEIGHT.match(name):
            experts[match["prefix"]][int(match["expert"]), match["proj"]] = tensor
        else:
            fused[name] = tensor
    for prefix, parts in experts.items():
        count = 1 + max(expert for expert, _ in parts)
        fused[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate"].T, parts[e, "up"].T], dim=1) for e in range(count)]
        )
        fused[f"{prefix}.down_proj"] = torch.stack([parts[e, "down"].T for e in range(count)])
    for shard in shards:
        (ckpt / shard).unlink()
    save_checkpoint(ckpt, json.loads((ckpt / "config.json").read_text()), fused)
