"""A tiny EAGLE-3 drafter head with random weights, in the layout of the published Llama-style
EAGLE-3 heads (``LlamaForCausalLMEagle3``, run by vLLM as ``Eagle3LlamaForCausalLM``).

EAGLE-3 is target-agnostic: one decoder layer (``midlayer.*``) whose attention reads the
token embedding concatenated with the drafter's hidden state (q/k/v take ``2 * H`` inputs),
``fc`` [H, n_aux * H] fusing the target's aux hidden states, a final ``norm`` and its own
``lm_head``; the embedding is the target's. ``eagle_config.eagle_aux_hidden_state_layer_ids``
names the target layers read (vLLM's defaults collapse to two ids on a 4-layer target).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm_laguna.tiny.weights import RandomWeights, save_checkpoint


@dataclass
class Eagle3Tiny:
    hidden_size: int = 64
    vocab_size: int = 512
    num_heads: int = 2
    num_kv_heads: int = 2
    intermediate_size: int = 96
    #: target layers whose input the target reports (vLLM's aux-layer ids)
    aux_layer_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    weight_std: float = 0.08
    seed: int = 2

    def config(self) -> dict[str, Any]:
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": 1,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.vocab_size,
            "target_hidden_size": self.hidden_size,
            "tie_word_embeddings": False,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.aux_layer_ids)},
            "dtype": "float32",
        }

    def state_dict(self):
        w = RandomWeights(self.seed, self.weight_std)
        H, D = self.hidden_size, self.hidden_size // self.num_heads
        p = "midlayer"
        return {
            "fc.weight": w.normal(H, len(self.aux_layer_ids) * H),
            "norm.weight": w.norm(H),
            "lm_head.weight": w.normal(self.vocab_size, H),
            f"{p}.input_layernorm.weight": w.norm(H),
            f"{p}.hidden_norm.weight": w.norm(H),
            f"{p}.post_attention_layernorm.weight": w.norm(H),
            f"{p}.self_attn.q_proj.weight": w.normal(self.num_heads * D, 2 * H),
            f"{p}.self_attn.k_proj.weight": w.normal(self.num_kv_heads * D, 2 * H),
            f"{p}.self_attn.v_proj.weight": w.normal(self.num_kv_heads * D, 2 * H),
            f"{p}.self_attn.o_proj.weight": w.normal(H, self.num_heads * D),
            f"{p}.mlp.gate_proj.weight": w.normal(self.intermediate_size, H),
            f"{p}.mlp.up_proj.weight": w.normal(self.intermediate_size, H),
            f"{p}.mlp.down_proj.weight": w.normal(H, self.intermediate_size),
        }


def build_eagle3(out_dir: str | Path, spec: Eagle3Tiny | None = None) -> Path:
    """Write a tiny EAGLE-3 head for a target of ``spec.hidden_size``/``spec.vocab_size``."""
    spec = spec or Eagle3Tiny()
    out = Path(out_dir)
    save_checkpoint(out, spec.config(), spec.state_dict())
    return out
