"""LFM2 config: read, validate and resolve an ``Lfm2Config`` (or its raw JSON form).

LFM2 configs come in two forms, and this module reads both the way transformers does:

* transformers v5 writes ``layer_types``, ``intermediate_size``, ``rope_parameters`` and
  ``tie_word_embeddings``, and no ``conv_dim``/``block_dim``/``block_ff_dim``;
* LiquidAI's first Hub configs write ``full_attn_idxs`` (attention layer indices, the others
  conv; absent both, every layer is attention), ``block_ff_dim`` (which wins over
  ``intermediate_size``), ``tie_embedding`` (which wins over ``tie_word_embeddings``),
  ``rope_theta``, and ``conv_dim``/``conv_dim_out``/``block_dim``, which transformers ignores
  (it sizes every block by ``hidden_size``): they must equal ``hidden_size`` here.

The feed-forward width follows ``block_auto_adjust_ff_dim``: ``int(2 * I / 3)``, then, only
if ``block_ffn_dim_multiplier`` is set, ``int(multiplier * width)`` rounded up to a multiple
of ``block_multiple_of``. The attention head size is ``head_dim`` when the config has one,
else ``hidden_size // num_attention_heads``.

Keys of LiquidAI's original code that transformers ignores are checked, not ignored:
``block_use_swiglu: false`` (a plain MLP) and ``use_pos_enc: false`` (no RoPE) are refused,
and the aliases ``num_heads`` and ``block_norm_eps`` must equal ``num_attention_heads`` and
``norm_eps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vllm_laguna.configs.errors import ConfigError, per_layer_list, positive_int
from vllm_laguna.configs.keys import warn_unknown_keys

MODEL = "LFM2"
LAYER_TYPES = ("conv", "full_attention")
#: transformers' Lfm2Config.default_theta
DEFAULT_ROPE_THETA = 1_000_000.0
#: legacy width keys that transformers ignores; they must agree with hidden_size
_WIDTH_ALIASES = ("conv_dim", "conv_dim_out", "block_dim")
_MISSING = object()

#: config.json keys :func:`parse_lfm2_config` reads (to use, or to refuse values)
READ_KEYS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "norm_eps",
        "block_norm_eps",
        "layer_types",
        "full_attn_idxs",
        "conv_bias",
        "conv_L_cache",
        "conv_dim",
        "conv_dim_out",
        "block_dim",
        "block_ff_dim",
        "intermediate_size",
        "block_auto_adjust_ff_dim",
        "block_ffn_dim_multiplier",
        "block_multiple_of",
        "block_use_swiglu",
        "use_pos_enc",
        "rope_parameters",
        "rope_scaling",
        "rope_theta",
        "theta",
        "tie_embedding",
        "tie_word_embeddings",
    }
)
#: keys of LFM2 configs that do not change inference: training-time initialisation and
#: bookkeeping (README: Config keys)
IGNORED_KEYS = frozenset(
    {"block_mlp_init_scale", "block_out_init_scale", "block_use_xavier_init", "conv_use_xavier_init", "model_name"}
)
#: keys whose value must equal another key's (an alias from LiquidAI's original code)
_ALIASES = {"num_heads": "num_attention_heads", "block_norm_eps": "norm_eps"}


@dataclass(frozen=True)
class Lfm2Arch:
    """Everything the LFM2 model reads from its config, validated and resolved."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: rope dict for vLLM's ``get_rope``
    rope: dict[str, Any]
    max_position_embeddings: int
    #: SwiGLU width after the block_auto_adjust_ff_dim rule
    ff_dim: int
    conv_kernel: int
    conv_bias: bool
    norm_eps: float
    tie_word_embeddings: bool

    def is_conv(self, layer: int) -> bool:
        return self.layer_types[layer] == "conv"


def parse_lfm2_config(config: Any) -> Lfm2Arch:
    """Validate ``config`` (a transformers ``Lfm2Config`` or any object with the raw JSON
    fields as attributes) and resolve it into an :class:`Lfm2Arch`.

    Keys outside :data:`READ_KEYS` and :data:`IGNORED_KEYS` get one warning naming them.

    Raises:
        ConfigError: naming the offending field and the value expected.
    """
    warn_unknown_keys(MODEL, config, READ_KEYS | IGNORED_KEYS)
    if not _bool(config, "block_use_swiglu", True):
        raise ConfigError(MODEL, "block_use_swiglu", "true (the feed-forward is SwiGLU, as in transformers)", False)
    if not _bool(config, "use_pos_enc", True):
        raise ConfigError(MODEL, "use_pos_enc", "true (attention layers use RoPE, as in transformers)", False)
    for alias, field in _ALIASES.items():
        value, reference = getattr(config, alias, None), getattr(config, field, None)
        if value is not None and reference is not None and value != reference:
            raise ConfigError(MODEL, alias, f"{field}={reference!r} (an alias of it)", value)
    num_layers = positive_int(MODEL, config, "num_hidden_layers")
    hidden = positive_int(MODEL, config, "hidden_size")
    for field in _WIDTH_ALIASES:
        value = getattr(config, field, None)
        if value is not None and value != hidden:
            raise ConfigError(MODEL, field, f"hidden_size={hidden} (transformers sizes every block by it)", value)

    num_heads = positive_int(MODEL, config, "num_attention_heads")
    num_kv = positive_int(MODEL, config, "num_key_value_heads")
    if num_heads % num_kv:
        raise ConfigError(MODEL, "num_key_value_heads", f"a divisor of num_attention_heads={num_heads}", num_kv)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        if hidden % num_heads:
            raise ConfigError(
                MODEL, "num_attention_heads", f"a divisor of hidden_size={hidden} (no head_dim given)", num_heads
            )
        head_dim = hidden // num_heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim <= 0 or head_dim % 2:
        raise ConfigError(MODEL, "head_dim", "a positive even integer", head_dim)

    conv_kernel = positive_int(MODEL, config, "conv_L_cache", 3)
    if conv_kernel < 2:
        raise ConfigError(
            MODEL, "conv_L_cache", "an integer >= 2 (the conv keeps conv_L_cache - 1 columns)", conv_kernel
        )

    return Lfm2Arch(
        vocab_size=positive_int(MODEL, config, "vocab_size"),
        hidden_size=hidden,
        num_layers=num_layers,
        layer_types=_layer_types(config, num_layers),
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        rope=_rope(config),
        max_position_embeddings=positive_int(MODEL, config, "max_position_embeddings", 128_000),
        ff_dim=_ff_dim(config),
        conv_kernel=conv_kernel,
        conv_bias=_bool(config, "conv_bias", False),
        norm_eps=_positive_float(config, "norm_eps", 1e-5),
        tie_word_embeddings=_tie_word_embeddings(config),
    )


def _layer_types(config: Any, num_layers: int) -> tuple[str, ...]:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return per_layer_list(MODEL, "layer_types", layer_types, num_layers, LAYER_TYPES)
    idxs = getattr(config, "full_attn_idxs", None)
    if idxs is None:  # transformers' default: every layer is attention
        return ("full_attention",) * num_layers
    if not isinstance(idxs, (list, tuple)):
        raise ConfigError(MODEL, "full_attn_idxs", f"a list of layer indices in [0, {num_layers})", idxs)
    for i, idx in enumerate(idxs):
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < num_layers:
            raise ConfigError(MODEL, f"full_attn_idxs[{i}]", f"a layer index in [0, {num_layers})", idx)
    return tuple("full_attention" if i in idxs else "conv" for i in range(num_layers))


def _ff_dim(config: Any) -> int:
    # raw Hub form: block_ff_dim wins over intermediate_size, as in transformers
    field = "block_ff_dim" if getattr(config, "block_ff_dim", None) is not None else "intermediate_size"
    width = positive_int(MODEL, config, field)
    if not _bool(config, "block_auto_adjust_ff_dim", True):
        return width
    width = int(2 * width / 3)
    multiplier = getattr(config, "block_ffn_dim_multiplier", 1.0)
    if multiplier is not None:
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier > 0:
            raise ConfigError(MODEL, "block_ffn_dim_multiplier", "a positive number or null", multiplier)
        multiple_of = positive_int(MODEL, config, "block_multiple_of", 256)
        width = int(multiplier * width)
        width = multiple_of * -(-width // multiple_of)
    if width <= 0:
        raise ConfigError(MODEL, field, "a size whose block_auto_adjust_ff_dim width is positive", width)
    return width


def _rope(config: Any) -> dict[str, Any]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if params is None:
        theta = getattr(config, "rope_theta", None)
        theta = getattr(config, "theta", DEFAULT_ROPE_THETA) if theta is None else theta
        params = {"rope_type": "default", "rope_theta": theta}
    if not isinstance(params, dict):
        raise ConfigError(MODEL, "rope_parameters", "a dict", params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta", getattr(config, "rope_theta", None) or DEFAULT_ROPE_THETA)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not theta > 0:
        raise ConfigError(MODEL, "rope_parameters.rope_theta", "a positive number", theta)
    if rope_type == "default":
        # LFM2's default rope rotates the whole head (it ignores partial_rotary_factor)
        return {"rope_type": "default", "rope_theta": float(theta)}
    out = {k: v for k, v in params.items() if k != "type"}
    out.update(rope_type=rope_type, rope_theta=float(theta))
    return out


def _tie_word_embeddings(config: Any) -> bool:
    # raw Hub form: tie_embedding wins, as in transformers
    if getattr(config, "tie_embedding", None) is not None:
        return _bool(config, "tie_embedding", True)
    return _bool(config, "tie_word_embeddings", True)


def _bool(config: Any, field: str, default: bool) -> bool:
    value = getattr(config, field, _MISSING)
    if value is _MISSING or value is None:
        return default
    if not isinstance(value, bool):
        raise ConfigError(MODEL, field, "true or false", value)
    return value


def _positive_float(config: Any, field: str, default: float) -> float:
    value = getattr(config, field, None)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise ConfigError(MODEL, field, "a positive number", value)
    return float(value)
