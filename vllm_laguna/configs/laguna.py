"""Laguna config: read, validate and resolve a ``LagunaConfig`` (or its raw JSON form).

Quirks handled here, and nowhere else:

* ``rope_parameters`` nested per layer type (``{"full_attention": {...},
  "sliding_attention": {...}}``), possibly beside stray flat keys, which transformers ignores;
  a flat dict applies to every layer type. Missing entries are filled the way transformers'
  ``standardize_rope_params`` does (``rope_theta``/``partial_rotary_factor`` from the top
  level, YaRN's ``original_max_position_embeddings`` from ``max_position_embeddings``).
* legacy flat ``rope_parameters`` (the full layers' rope) with the sliding layers' rope in
  ``swa_rope_parameters``, as vLLM's in-tree Laguna reads them.
* ``gating``: ``"per-head"``, ``"per-element"``, ``false`` (no gate) or ``true``, which is
  ambiguous in the wild (transformers reads it as per-head, M.1's remote code as
  per-element): ``true`` is resolved from the ``g_proj`` weight's shape at load time.
* ``gating_types``: per-layer gate kinds (``"per-head"``/``"per-element"``), authoritative
  where present (as in llama.cpp); it must agree with an explicit ``gating`` and cannot
  stand beside ``gating: false``. Each layer's ``g_proj`` weight is checked against its
  kind while loading. Both keys also take the underscore spelling (``"per_head"``), as some
  S-2.1 configs write it and llama.cpp accepts.
* ``mlp_only_layers``/``decoder_sparse_step`` (the older dense-layer schedule): must agree
  with ``mlp_layer_types``, which transformers fills (one leading dense layer) when a config
  lacks it; ``num_experts: 0`` (the DFlash drafters) makes every layer dense, as in vLLM.
* keys whose other values change the math in ways nobody implements here are refused:
  ``norm_topk_prob: false``, ``moe_router_use_sigmoid: false`` (softmax routing),
  ``qkv_bias: true`` (mlx-lm's separate q/k/v bias), ``use_bidirectional_attention: true``,
  ``moe_apply_router_weight_on_input: true``.
* ``swa_attention_sink_enabled``: a learnable per-head attention sink on sliding layers
  (``self_attn.sink``, one logit per query head in the softmax denominator, as vLLM's
  in-tree Laguna defines it).
* ``moe_router_score_func``: the router's score, ``"sigmoid"`` (default; every released
  checkpoint) or ``"sqrtsoftplus"`` (Poolside's next releases, as mlx-lm implements it;
  transformers 5.19 has no such key); any other value is refused.
* per-layer query-head counts, attention layer types and MLP layer types, with the defaults
  transformers uses when they are absent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

from vllm_laguna.configs.errors import ConfigError, per_layer_list, positive_int
from vllm_laguna.configs.keys import warn_unknown_keys
from vllm_laguna.kernels.sigmoid_topk import SCORE_FUNCS

MODEL = "Laguna"
LAYER_TYPES = ("full_attention", "sliding_attention")
MLP_LAYER_TYPES = ("dense", "sparse")

GateKind = Literal["per-head", "per-element", "from-weights", "none"]

#: config.json keys :func:`parse_laguna_config` reads (to use, or to refuse values)
READ_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_attention_heads_per_layer",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "layer_types",
        "sliding_window",
        "attention_bias",
        "qkv_bias",
        "use_bidirectional_attention",
        "gating",
        "gating_types",
        "swa_attention_sink_enabled",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "swa_rope_parameters",
        "mlp_layer_types",
        "mlp_only_layers",
        "decoder_sparse_step",
        "num_experts",
        "num_experts_per_tok",
        "moe_intermediate_size",
        "shared_expert_intermediate_size",
        "moe_routed_scaling_factor",
        "moe_router_logit_softcapping",
        "moe_router_score_func",
        "moe_router_use_sigmoid",
        "norm_topk_prob",
        "moe_apply_router_weight_on_input",
    }
)
#: keys of Laguna configs (transformers' LagunaConfig, the Hub's) that do not change
#: inference: training-only or debug settings (README: Config keys)
IGNORED_KEYS = frozenset({"attention_dropout", "output_router_logits", "router_aux_loss_coef"})

#: values of these keys change the math in ways nobody implements here: (refused, why)
_REFUSED_VALUES = {
    "norm_topk_prob": (False, "true (the chosen experts' weights are always renormalised)"),
    "moe_router_use_sigmoid": (False, "true (Laguna routes by sigmoid or sqrt-softplus scores, not softmax)"),
    "qkv_bias": (True, "false (q/k/v biases come with attention_bias, as in transformers)"),
    "use_bidirectional_attention": (True, "false (Laguna attends causally)"),
    "moe_apply_router_weight_on_input": (
        True,
        "false (router weights on the expert input are unsupported, as in transformers)",
    ),
}

# Keys of a YaRN rope dict that vLLM's get_rope understands (besides type/theta/factor).
_YARN_KEYS = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate")


@dataclass(frozen=True)
class LagunaArch:
    """Everything the Laguna model reads from its config, validated and resolved."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    head_dim: int
    num_kv_heads: int
    heads_per_layer: tuple[int, ...]
    layer_types: tuple[str, ...]
    sliding_window: int | None
    #: rope dict for vLLM's ``get_rope`` per layer type used by the model
    rope_by_layer_type: dict[str, dict[str, Any]]
    max_position_embeddings: int
    mlp_layer_types: tuple[str, ...]
    intermediate_size: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    top_k: int
    routed_scaling_factor: float
    router_logit_softcapping: float
    #: ``moe_router_score_func``: "sigmoid" or "sqrtsoftplus"
    router_score_func: str
    gating: GateKind
    #: per-layer gate kinds from ``gating_types``, None when the config has none
    gating_types: tuple[str, ...] | None
    #: ``swa_attention_sink_enabled``: sliding layers carry a per-head attention sink
    swa_attention_sink: bool
    rms_norm_eps: float
    attention_bias: bool
    tie_word_embeddings: bool

    def window(self, layer: int) -> int | None:
        """Sliding window of ``layer`` (inclusive of the current token), None on full layers."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def gate(self, layer: int) -> GateKind:
        """The output gate of ``layer``: ``gating_types[layer]`` where given, else ``gating``."""
        if self.gating == "none" or self.gating_types is None:
            return self.gating
        return self.gating_types[layer]

    def gate_field(self, layer: int) -> str:
        """The config field that decides ``layer``'s gate (for error messages)."""
        return f"gating_types[{layer}]" if self.gating_types is not None else "gating"

    def has_sink(self, layer: int) -> bool:
        """Whether ``layer`` has an attention sink (sliding layers, when enabled)."""
        return self.swa_attention_sink and self.layer_types[layer] == "sliding_attention"

    def rope(self, layer: int) -> dict[str, Any]:
        return self.rope_by_layer_type[self.layer_types[layer]]


def parse_laguna_config(config: Any, extra_keys: frozenset[str] = frozenset()) -> LagunaArch:
    """Validate ``config`` (a transformers config object) and resolve it into a LagunaArch.

    Keys outside :data:`READ_KEYS` and :data:`IGNORED_KEYS` (and ``extra_keys``, which a
    caller reads itself) get one warning naming them.

    Raises:
        ConfigError: naming the offending field and the value expected.
    """
    warn_unknown_keys(MODEL, config, READ_KEYS | IGNORED_KEYS | extra_keys)
    for field, (refused, expected) in _REFUSED_VALUES.items():
        value = getattr(config, field, None)
        if value is not None and value == refused:
            raise ConfigError(MODEL, field, expected, value)
    num_layers = positive_int(MODEL, config, "num_hidden_layers")
    hidden = positive_int(MODEL, config, "hidden_size")
    num_heads = positive_int(MODEL, config, "num_attention_heads")
    head_dim = getattr(config, "head_dim", None) or hidden // num_heads
    if not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ConfigError(MODEL, "head_dim", "a positive even integer", head_dim)
    num_kv = positive_int(MODEL, config, "num_key_value_heads")

    heads = getattr(config, "num_attention_heads_per_layer", None) or [num_heads] * num_layers
    heads = per_layer_list(MODEL, "num_attention_heads_per_layer", heads, num_layers)
    for i, h in enumerate(heads):
        if isinstance(h, bool) or not isinstance(h, int) or h <= 0 or h % num_kv:
            raise ConfigError(
                MODEL,
                f"num_attention_heads_per_layer[{i}]",
                f"a positive multiple of num_key_value_heads={num_kv}",
                h,
            )

    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * num_layers
    layer_types = per_layer_list(MODEL, "layer_types", layer_types, num_layers, LAYER_TYPES)
    sliding_window = getattr(config, "sliding_window", None)
    if "sliding_attention" in layer_types:
        sliding_window = positive_int(MODEL, config, "sliding_window")
    else:
        sliding_window = None

    mlp_types = _resolve_mlp_layer_types(config, num_layers)
    has_sparse = "sparse" in mlp_types
    num_experts = positive_int(MODEL, config, "num_experts") if has_sparse else 0
    top_k = positive_int(MODEL, config, "num_experts_per_tok") if has_sparse else 0
    if has_sparse and top_k > num_experts:
        raise ConfigError(MODEL, "num_experts_per_tok", f"at most num_experts={num_experts}", top_k)
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(MODEL, "hidden_act", '"silu"', config.hidden_act)
    softcap = float(getattr(config, "moe_router_logit_softcapping", 0.0) or 0.0)
    if softcap < 0:
        raise ConfigError(MODEL, "moe_router_logit_softcapping", "a value >= 0 (0 disables it)", softcap)
    score_func = getattr(config, "moe_router_score_func", SCORE_FUNCS[0])
    if score_func not in SCORE_FUNCS:
        raise ConfigError(MODEL, "moe_router_score_func", " or ".join(f'"{f}"' for f in SCORE_FUNCS), score_func)

    gating = _resolve_gating(getattr(config, "gating", True))
    gating_types = _resolve_gating_types(getattr(config, "gating_types", None), gating, num_layers)
    sink = getattr(config, "swa_attention_sink_enabled", False)
    if not isinstance(sink, bool):
        raise ConfigError(MODEL, "swa_attention_sink_enabled", "true or false", sink)

    max_pos = positive_int(MODEL, config, "max_position_embeddings", 131072)
    rope = _resolve_rope(config, sorted(set(layer_types)), head_dim, max_pos)

    return LagunaArch(
        vocab_size=positive_int(MODEL, config, "vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        head_dim=head_dim,
        num_kv_heads=num_kv,
        heads_per_layer=heads,
        layer_types=layer_types,
        sliding_window=sliding_window,
        rope_by_layer_type=rope,
        max_position_embeddings=max_pos,
        mlp_layer_types=mlp_types,
        intermediate_size=(
            positive_int(MODEL, config, "intermediate_size") if "dense" in mlp_types else 0
        ),
        moe_intermediate_size=positive_int(MODEL, config, "moe_intermediate_size") if has_sparse else 0,
        shared_expert_intermediate_size=int(getattr(config, "shared_expert_intermediate_size", 0) or 0)
        if has_sparse
        else 0,
        num_experts=num_experts,
        top_k=top_k,
        routed_scaling_factor=float(getattr(config, "moe_routed_scaling_factor", 1.0) or 1.0),
        router_logit_softcapping=softcap,
        router_score_func=score_func,
        gating=gating,
        gating_types=gating_types,
        swa_attention_sink=sink,
        rms_norm_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        attention_bias=bool(getattr(config, "attention_bias", False)),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def _resolve_mlp_layer_types(config: Any, num_layers: int) -> tuple[str, ...]:
    """``mlp_layer_types`` (transformers' default when absent: one leading dense layer), all
    dense under ``num_experts: 0`` (the drafters; vLLM builds experts only when there are
    some), checked against the older ``mlp_only_layers``/``decoder_sparse_step`` schedule
    where a config has it (layer ``i`` dense iff listed, or ``(i + 1) % step != 0``)."""
    if getattr(config, "num_experts", None) == 0:
        return ("dense",) * num_layers
    mlp_types = getattr(config, "mlp_layer_types", None) or ["dense"] + ["sparse"] * (num_layers - 1)
    mlp_types = per_layer_list(MODEL, "mlp_layer_types", mlp_types, num_layers, MLP_LAYER_TYPES)
    dense_only = getattr(config, "mlp_only_layers", None)
    step = getattr(config, "decoder_sparse_step", None)
    if dense_only is None and step is None:
        return mlp_types
    dense = [i for i, kind in enumerate(mlp_types) if kind == "dense"]
    step = 1 if step is None else step
    if isinstance(step, bool) or not isinstance(step, int) or step <= 0:
        raise ConfigError(MODEL, "decoder_sparse_step", "a positive integer", step)
    listed = set(dense_only or [])
    implied = [i for i in range(num_layers) if i in listed or (i + 1) % step]
    if implied != dense:
        field = "mlp_only_layers" if dense_only is not None else "decoder_sparse_step"
        raise ConfigError(
            MODEL,
            field,
            f"the schedule of mlp_layer_types, whose dense layers are {dense} (transformers puts one "
            "leading dense layer there when config.json has no mlp_layer_types: add it); "
            f"mlp_only_layers={dense_only} with decoder_sparse_step={step} makes {implied} dense",
        )
    return mlp_types


def _gate_kind(value: Any) -> Any:
    """``"per_head"``/``"per_element"`` as written in some S-2.1 configs -> the hyphenated kind."""
    return value.replace("_", "-") if isinstance(value, str) else value


def _resolve_gating(value: Any) -> GateKind:
    value = _gate_kind(value)
    if value is True:
        return "from-weights"
    if value is False or value is None:
        return "none"
    if value in ("per-head", "per-element"):
        return value
    raise ConfigError(MODEL, "gating", 'true, false, "per-head" or "per-element"', value)


def _resolve_gating_types(value: Any, gating: GateKind, num_layers: int) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = [_gate_kind(kind) for kind in value]
    kinds = per_layer_list(MODEL, "gating_types", value, num_layers, ("per-head", "per-element"))
    if gating == "none":
        raise ConfigError(MODEL, "gating_types", "no per-layer gate kinds when `gating` is false", list(kinds))
    for i, kind in enumerate(kinds):
        if gating in ("per-head", "per-element") and kind != gating:
            raise ConfigError(MODEL, f"gating_types[{i}]", f"{gating!r}, as `gating` says", kind)
    return kinds


def _resolve_rope(
    config: Any, layer_types: list[str], head_dim: int, max_pos: int
) -> dict[str, dict[str, Any]]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        raise ConfigError(MODEL, "rope_parameters", "a dict (optionally nested per layer type)", params)
    nested = any(k in LAYER_TYPES for k in params)
    sliding = None if nested else getattr(config, "swa_rope_parameters", None)
    if sliding is not None and not isinstance(sliding, dict):
        raise ConfigError(MODEL, "swa_rope_parameters", "a rope dict for the sliding_attention layers", sliding)
    resolved = {}
    for layer_type in layer_types:
        field = f"rope_parameters.{layer_type}" if nested else "rope_parameters"
        entry = params.get(layer_type) if nested else params
        if sliding is not None and layer_type == "sliding_attention":
            field, entry = "swa_rope_parameters", sliding
        if not isinstance(entry, dict):
            raise ConfigError(MODEL, field, f"a rope dict for the {layer_type} layers", entry)
        resolved[layer_type] = _resolve_rope_entry(config, field, dict(entry), head_dim, max_pos)
    return resolved


def _resolve_rope_entry(
    config: Any, field: str, entry: dict[str, Any], head_dim: int, max_pos: int
) -> dict[str, Any]:
    rope_type = entry.get("rope_type", entry.get("type", "default"))
    theta = entry.get("rope_theta", getattr(config, "rope_theta", None))
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(MODEL, f"{field}.rope_theta", "a positive number", theta)
    partial = entry.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None))
    partial = 1.0 if partial is None else float(partial)
    if not 0.0 < partial <= 1.0 or int(head_dim * partial) % 2:
        raise ConfigError(
            MODEL,
            f"{field}.partial_rotary_factor",
            f"a value in (0, 1] giving an even rotary dim of head_dim={head_dim}",
            partial,
        )
    out: dict[str, Any] = {
        "rope_type": rope_type,
        "rope_theta": float(theta),
        "partial_rotary_factor": partial,
    }
    if rope_type == "default":
        return out
    if rope_type != "yarn":
        # Other scaling types go to vLLM's get_rope with their own keys untouched.
        out.update({k: v for k, v in entry.items() if k not in ("type", "rope_type")})
        out["rope_type"] = rope_type
        return out
    original = entry.get("original_max_position_embeddings", max_pos)
    factor = entry.get("factor")
    if factor is None:  # transformers derives it from the two context lengths
        factor = max_pos / original
    if not isinstance(factor, (int, float)) or factor <= 0 or math.isnan(factor):
        raise ConfigError(MODEL, f"{field}.factor", "a positive number", factor)
    out["factor"] = float(factor)
    out["original_max_position_embeddings"] = int(original)
    for key in _YARN_KEYS:
        if entry.get(key) is not None:
            out[key] = entry[key]
    # transformers treats a falsy beta as "use the default" (`get(...) or 32`)
    out["beta_fast"] = entry.get("beta_fast") or 32
    out["beta_slow"] = entry.get("beta_slow") or 1
    return out
