"""Weight bytes of a Laguna checkpoint per quantization scheme, counted from its config.

    python benchmarks/weight_memory.py                    # Laguna-XS.2 (its published config's sizes)
    python benchmarks/weight_memory.py --config DIR/config.json

Parameters are counted by the config parser's own reading of the config
(:func:`vllm_laguna.configs.laguna.parse_laguna_config`), in three groups: routed experts,
the other linears (attention, gates, dense MLPs, shared experts) and what every scheme keeps
in bf16 (embedding, LM head, routers, norms, biases). Schemes: int8 W8A8 (one scale per
output channel), int4 W4A16 (one bf16 scale per group of ``--group-size`` inputs), each on the
routed experts alone or on every linear but the LM head and routers; AWQ / GPTQ int4 (a zero
point per group too) on every linear, as those tools write them.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

#: Laguna-XS.2's sizes (its published config; FACTS.md in the workplace)
XS2 = {
    "vocab_size": 100352,
    "hidden_size": 2048,
    "num_hidden_layers": 40,
    "num_attention_heads": 64,
    "num_attention_heads_per_layer": [48, 64, 64, 64] * 10,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "layer_types": ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"] * 10,
    "sliding_window": 512,
    "rope_parameters": {
        "full_attention": {
            "rope_type": "yarn", "rope_theta": 500000.0, "factor": 32.0, "original_max_position_embeddings": 4096,
            "beta_fast": 64.0, "beta_slow": 1.0, "attention_factor": 1.0, "partial_rotary_factor": 0.5,
        },
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    },
    "max_position_embeddings": 131072,
    "mlp_layer_types": ["dense"] + ["sparse"] * 39,
    "intermediate_size": 8192,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "gating": "per-head",
}  # fmt: skip


def parameter_groups(arch) -> dict[str, int]:
    """Parameter counts: routed experts, other linears, always-bf16 (embeddings, head, routers, norms)."""
    h, d = arch.hidden_size, arch.head_dim
    experts = linears = kept = 0
    kept += arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2) + h
    for i in range(arch.num_layers):
        heads = arch.heads_per_layer[i]
        linears += 2 * heads * d * h + 2 * arch.num_kv_heads * d * h  # q, o; k, v
        gate = arch.gate(i)
        linears += h * (heads * d if gate == "per-element" else heads if gate != "none" else 0)
        kept += 2 * h + 2 * d  # layer norms, q/k norms
        if arch.mlp_layer_types[i] == "dense":
            linears += 3 * h * arch.intermediate_size
        else:
            experts += arch.num_experts * 3 * h * arch.moe_intermediate_size
            linears += 3 * h * arch.shared_expert_intermediate_size
            kept += arch.num_experts * h + arch.num_experts  # router, correction bias
    return {"experts": experts, "linears": linears, "kept": kept}


def int8_bytes(params: int, rows: int) -> int:
    return params + 4 * rows  # int8 weights, one fp32 scale per output channel


def int4_bytes(params: int, group_size: int) -> int:
    return params // 2 + 2 * (params // group_size)  # packed nibbles, one bf16 scale per group


def int4_zero_point_bytes(params: int, group_size: int) -> int:
    """AWQ / GPTQ: packed nibbles, one fp16 scale and one packed 4-bit zero point per group
    (GPTQ's ``g_idx``, one int32 per input column of a layer, is left out: under 0.1%)."""
    return params // 2 + 2 * (params // group_size) + params // group_size // 2


def scheme_bytes(groups: dict[str, int], arch, group_size: int) -> dict[str, int]:
    """Bytes of the weights per scheme (output-channel counts approximated by params / input width)."""
    bf16 = {name: 2 * n for name, n in groups.items()}
    expert_rows = groups["experts"] // arch.hidden_size
    linear_rows = groups["linears"] // arch.hidden_size
    int8_experts = int8_bytes(groups["experts"], expert_rows)
    int4_experts = int4_bytes(groups["experts"], group_size)
    int8_linears = int8_bytes(groups["linears"], linear_rows)
    return {
        "bf16": sum(bf16.values()),
        "int8 experts": int8_experts + bf16["linears"] + bf16["kept"],
        "int8 experts + linears": int8_experts + int8_linears + bf16["kept"],
        f"int4 g{group_size} experts": int4_experts + bf16["linears"] + bf16["kept"],
        f"int4 g{group_size} experts + int8 linears": int4_experts + int8_linears + bf16["kept"],
        f"int4 g{group_size} experts + int4 linears": int4_experts + int4_bytes(groups["linears"], group_size)
        + bf16["kept"],
        f"AWQ / GPTQ int4 g{group_size}, every linear": sum(
            int4_zero_point_bytes(groups[g], group_size) for g in ("experts", "linears")
        )
        + bf16["kept"],
    }


def main() -> None:
    from vllm_laguna.configs.laguna import parse_laguna_config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="a Laguna config.json (default: Laguna-XS.2's sizes)")
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    raw = json.load(open(args.config)) if args.config else XS2
    arch = parse_laguna_config(SimpleNamespace(**raw))
    groups = parameter_groups(arch)
    total = sum(groups.values())
    print(f"{total / 1e9:.2f} B parameters: routed experts {groups['experts'] / 1e9:.2f} B, other linears "
          f"{groups['linears'] / 1e9:.2f} B, embeddings/head/routers/norms {groups['kept'] / 1e9:.2f} B")
    sizes = scheme_bytes(groups, arch, args.group_size)
    print("| scheme | weights GB | x bf16 |\n|---|---|---|")
    for name, size in sizes.items():
        print(f"| {name} | {size / 1e9:.1f} | {size / sizes['bf16']:.2f} |")


if __name__ == "__main__":
    main()
