"""Llama 4 text config: read, validate and resolve a ``Llama4TextConfig``.

The config may be a text config (``Llama4ForCausalLM`` checkpoints, ``model_type:
llama4_text``) or a multimodal ``Llama4Config`` (``Llama4ForConditionalGeneration``), whose
``text_config`` is read; errors then name the field as ``text_config.<field>``.

Quirks handled here, and nowhere else, the way transformers resolves them:

* ``no_rope_layers``: a per-layer list where ``1`` means *uses RoPE* (despite the name), or
  empty / absent, meaning a NoPE layer every ``no_rope_layer_interval`` layers
  (``int((i + 1) % interval != 0)``, Scout's ``[]``).
* ``layer_types``: absent means ``chunked_attention`` on RoPE layers and ``full_attention``
  on NoPE layers; transformers masks by ``layer_types`` and rotates by ``no_rope_layers``.
* ``moe_layers``: absent means every ``interleave_moe_layer_step``-th layer
  (``range(step - 1, num_hidden_layers, step)``).
* ``attn_temperature_tuning``: a bool, or an int read by truthiness (older Hub configs
  write ``4``); transformers applies it whenever the config says so, whatever the context
  length (vLLM's in-tree model instead decides from the generation config and
  ``max_model_len``, which is where it departs from transformers).
* RoPE: ``rope_parameters`` (transformers v5) or ``rope_scaling`` + ``rope_theta`` (Hub
  configs); ``default`` and ``llama3`` scaling, applied to the whole head.

* ``nope_layer_interval`` (Meta's name for ``no_rope_layer_interval``, which transformers
  ignores) must agree with the RoPE layers resolved above.

What the KV cache needs of ``attention_chunk_size`` depends on the engine, not the config:
:func:`check_chunk_fits_kv_blocks` is called by the model with vLLM's block size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm_laguna.configs.errors import ConfigError, per_layer_list
from vllm_laguna.configs.keys import warn_unknown_keys

MODEL = "Llama4"
LAYER_TYPES = ("chunked_attention", "full_attention")
ROPE_TYPES = ("default", "llama3")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")

#: keys of the text config :func:`parse_llama4_config` reads (to use, or to refuse values)
READ_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "attention_bias",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "partial_rotary_factor",
        "no_rope_layers",
        "no_rope_layer_interval",
        "nope_layer_interval",
        "layer_types",
        "attention_chunk_size",
        "use_qk_norm",
        "attn_temperature_tuning",
        "floor_scale",
        "attn_scale",
        "num_local_experts",
        "num_experts_per_tok",
        "intermediate_size",
        "intermediate_size_mlp",
        "interleave_moe_layer_step",
        "moe_layers",
    }
)
#: text-config keys that do not change inference: training-only, debug, generation and
#: quantisation-tooling settings (README: Config keys)
IGNORED_KEYS = frozenset(
    {
        "attention_dropout",
        "output_router_logits",
        "router_aux_loss_coef",
        "router_jitter_noise",
        "for_llm_compressor",
        "cache_implementation",
    }
)
#: top-level keys of a multimodal config besides ``text_config``: the vision tower and image
#: tokens, which the text model does not use
MULTIMODAL_KEYS = frozenset(
    {"text_config", "vision_config", "boi_token_index", "eoi_token_index", "image_token_index", "tie_word_embeddings"}
)


@dataclass(frozen=True)
class Llama4Arch:
    """Everything the Llama 4 text model reads from its config, validated and resolved."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: per layer: rotates q/k (RoPE layer) or not (NoPE layer)
    uses_rope: tuple[bool, ...]
    #: per layer: attends within its ``attention_chunk_size`` chunk or globally
    chunked: tuple[bool, ...]
    attention_chunk_size: int | None
    #: RMS-normalise q and k (no weight) after RoPE, on RoPE layers
    use_qk_norm: bool
    #: scale q on NoPE layers by ``log1p(floor((pos + 1) / floor_scale)) * attn_scale + 1``
    temperature_tuning: bool
    floor_scale: float
    attn_scale: float
    #: per layer: MoE feed-forward or dense SwiGLU
    is_moe: tuple[bool, ...]
    num_experts: int
    top_k: int
    #: width of each expert and of the shared expert
    intermediate_size: int
    #: width of the dense feed-forward layers
    intermediate_size_mlp: int
    #: rope dict for vLLM's ``get_rope``
    rope: dict[str, Any]
    max_position_embeddings: int
    rms_norm_eps: float
    attention_bias: bool
    tie_word_embeddings: bool

    def qk_norm(self, layer: int) -> bool:
        return self.use_qk_norm and self.uses_rope[layer]

    def temperature(self, layer: int) -> bool:
        return self.temperature_tuning and not self.uses_rope[layer]

    def chunk_size(self, layer: int) -> int | None:
        return self.attention_chunk_size if self.chunked[layer] else None


class _Fields:
    """Reads fields of one config object, naming them as they appear in ``config.json``."""

    def __init__(self, config: Any, prefix: str):
        self.config = config
        self.prefix = prefix

    def get(self, field: str, default: Any = None) -> Any:
        return getattr(self.config, field, default)

    def error(self, field: str, expected: str, got: Any = None) -> ConfigError:
        return ConfigError(MODEL, self.prefix + field, expected, got)

    def positive_int(self, field: str, default: Any = None) -> int:
        value = self.get(field, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise self.error(field, "a positive integer", value)
        return value

    def number(self, field: str, default: Any, minimum: float, inclusive: bool = True) -> float:
        value = self.get(field, default)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok or not (value >= minimum if inclusive else value > minimum):
            raise self.error(field, f"a number {'>=' if inclusive else '>'} {minimum}", value)
        return float(value)

    def flag(self, field: str, default: bool) -> bool:
        value = self.get(field, default)
        if isinstance(value, bool):
            return value
        if isinstance(value, int):  # e.g. Scout's `attn_temperature_tuning: 4`
            return value != 0
        raise self.error(field, "true or false", value)

    def per_layer(self, field: str, value: Any, num_layers: int, allowed=None) -> tuple:
        return per_layer_list(MODEL, self.prefix + field, value, num_layers, allowed)


def parse_llama4_config(config: Any) -> Llama4Arch:
    """Validate ``config`` (a text or multimodal Llama 4 config) and resolve a Llama4Arch.

    Keys outside :data:`READ_KEYS` and :data:`IGNORED_KEYS` (at the top level of a multimodal
    config, :data:`MULTIMODAL_KEYS`) get one warning naming them.

    Raises:
        ConfigError: naming the offending field and the value expected.
    """
    text = getattr(config, "text_config", None)
    f = _Fields(text, "text_config.") if text is not None else _Fields(config, "")
    if text is not None:
        warn_unknown_keys(MODEL, config, MULTIMODAL_KEYS)
    warn_unknown_keys(MODEL, f.config, READ_KEYS | IGNORED_KEYS, where=f"config.json {f.prefix}".rstrip(". "))

    num_layers = f.positive_int("num_hidden_layers")
    hidden = f.positive_int("hidden_size")
    num_heads = f.positive_int("num_attention_heads")
    num_kv = f.positive_int("num_key_value_heads", num_heads)
    if num_heads % num_kv:
        raise f.error("num_key_value_heads", f"a divisor of num_attention_heads={num_heads}", num_kv)
    head_dim = f.get("head_dim") or hidden // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise f.error("head_dim", "a positive even integer", head_dim)
    if f.get("hidden_act", "silu") != "silu":
        raise f.error("hidden_act", '"silu"', f.get("hidden_act"))

    uses_rope = _resolve_no_rope_layers(f, num_layers)
    meta_interval = f.get("nope_layer_interval") and f.positive_int("nope_layer_interval")
    if meta_interval and uses_rope != tuple((i + 1) % meta_interval != 0 for i in range(num_layers)):
        raise f.error(
            "nope_layer_interval",
            "an interval agreeing with no_rope_layers / no_rope_layer_interval (Meta's name for the latter)",
            meta_interval,
        )
    chunked = _resolve_layer_types(f, num_layers, uses_rope)
    chunk = f.get("attention_chunk_size")
    if any(chunked) or chunk is not None:
        chunk = f.positive_int("attention_chunk_size")

    temperature_tuning = f.flag("attn_temperature_tuning", True) and not all(uses_rope)
    floor_scale = f.number("floor_scale", 8192, 0, inclusive=False) if temperature_tuning else 8192.0
    attn_scale = f.number("attn_scale", 0.1, 0) if temperature_tuning else 0.1

    is_moe = _resolve_moe_layers(f, num_layers)
    num_experts = f.positive_int("num_local_experts") if any(is_moe) else 0
    top_k = f.positive_int("num_experts_per_tok") if any(is_moe) else 0
    if top_k > num_experts:
        raise f.error("num_experts_per_tok", f"at most num_local_experts={num_experts}", top_k)
    intermediate = f.positive_int("intermediate_size") if any(is_moe) else 0
    intermediate_mlp = f.positive_int("intermediate_size_mlp") if not all(is_moe) else 0

    return Llama4Arch(
        vocab_size=f.positive_int("vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        uses_rope=uses_rope,
        chunked=chunked,
        attention_chunk_size=chunk,
        use_qk_norm=f.flag("use_qk_norm", True),
        temperature_tuning=temperature_tuning,
        floor_scale=floor_scale,
        attn_scale=attn_scale,
        is_moe=is_moe,
        num_experts=num_experts,
        top_k=top_k,
        intermediate_size=intermediate,
        intermediate_size_mlp=intermediate_mlp,
        rope=_resolve_rope(f),
        max_position_embeddings=f.positive_int("max_position_embeddings", 131072),
        rms_norm_eps=f.number("rms_norm_eps", 1e-5, 0, inclusive=False),
        attention_bias=f.flag("attention_bias", False),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
    )


def check_chunk_fits_kv_blocks(arch: Llama4Arch, block_size: int | None) -> None:
    """vLLM runs chunked local attention as one virtual request per chunk whose block table
    is a whole number of KV-cache blocks (``make_local_attention_virtual_batches`` asserts
    ``attention_chunk_size % block_size == 0``), on every attention backend. The CPU backend
    uses 128-token blocks unless ``block_size`` is given; CUDA backends 16 or more.
    """
    chunk = arch.attention_chunk_size
    if chunk is None or not any(arch.chunked) or not block_size or chunk % block_size == 0:
        return
    raise ConfigError(
        MODEL,
        "attention_chunk_size",
        f"a multiple of the KV-cache block size, {block_size} here (vLLM's chunked local "
        "attention works in whole KV blocks; a smaller --block-size / block_size dividing the "
        "chunk also works, on CPU a multiple of 32)",
        chunk,
    )


def _resolve_no_rope_layers(f: _Fields, num_layers: int) -> tuple[bool, ...]:
    value = f.get("no_rope_layers")
    if not value:  # None or [] -> a NoPE layer every `no_rope_layer_interval` layers
        interval = f.positive_int("no_rope_layer_interval", 4)
        return tuple((i + 1) % interval != 0 for i in range(num_layers))
    value = f.per_layer("no_rope_layers", value, num_layers, (0, 1))
    return tuple(bool(v) for v in value)


def _resolve_layer_types(f: _Fields, num_layers: int, uses_rope: tuple[bool, ...]) -> tuple[bool, ...]:
    value = f.get("layer_types")
    if value is None:
        return uses_rope
    value = f.per_layer("layer_types", value, num_layers, LAYER_TYPES)
    return tuple(t == "chunked_attention" for t in value)


def _resolve_moe_layers(f: _Fields, num_layers: int) -> tuple[bool, ...]:
    value = f.get("moe_layers")
    if value is None:
        step = f.positive_int("interleave_moe_layer_step", 1)
        value = range(step - 1, num_layers, step)
    elif isinstance(value, str) or not hasattr(value, "__iter__"):
        raise f.error("moe_layers", f"a list of layer indices in [0, {num_layers})", value)
    for layer in value:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < num_layers:
            raise f.error("moe_layers", f"layer indices in [0, num_hidden_layers={num_layers})", layer)
    moe = set(value)
    return tuple(i in moe for i in range(num_layers))


def _resolve_rope(f: _Fields) -> dict[str, Any]:
    params = f.get("rope_parameters") or f.get("rope_scaling") or {}
    field = "rope_parameters" if f.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise f.error(field, "a dict", params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise f.error(f"{field}.rope_type", " or ".join(map(repr, ROPE_TYPES)), rope_type)
    theta = params.get("rope_theta", f.get("rope_theta", 500000.0))
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise f.error("rope_theta", "a positive number", theta)
    partial = params.get("partial_rotary_factor", f.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise f.error("partial_rotary_factor", "1.0 (Llama 4 rotates the whole head)", partial)
    rope: dict[str, Any] = {"rope_type": rope_type, "rope_theta": float(theta)}
    if rope_type == "llama3":
        for key in _LLAMA3_KEYS:
            value = params.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise f.error(f"{field}.{key}", "a positive number", value)
            rope[key] = value
    return rope
