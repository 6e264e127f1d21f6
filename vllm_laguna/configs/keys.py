"""Config keys: which ones each model knows, and one warning for any other.

A key that changes the math and is silently skipped gives output that is wrong and looks
plausible. So every key of a model's ``config.json`` is either read by its parser (used, or
refused with a :class:`ConfigError` for values we do not implement) or listed in the parser's
``IGNORED_KEYS`` as not changing the math; the README's "Config keys" table gives the reason
and source of each. Any other key gets one warning at load naming it.

The keys come from the transformers config object vLLM hands the model (``to_dict()``), which
holds every ``config.json`` key (transformers keeps unknown ones as attributes) plus the
config class's own fields, which the per-model lists cover too.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: keys every transformers config has (``PretrainedConfig``) or checkpoints commonly carry
#: that no model's math reads here: class selection, bookkeeping, generation and training
#: settings, and what vLLM itself reads (``dtype``, token ids, ``quantization_config``)
COMMON_IGNORED_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "transformers_version",
        "auto_map",
        "dtype",
        "torch_dtype",
        "quantization_config",
        "use_cache",
        "initializer_range",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
        # PretrainedConfig's own fields (transformers 5.x)
        "chunk_size_feed_forward",
        "id2label",
        "label2id",
        "is_encoder_decoder",
        "output_attentions",
        "output_hidden_states",
        "problem_type",
        "return_dict",
    }
)

_warned: set[tuple[str, tuple[str, ...]]] = set()


def config_keys(config: Any) -> set[str]:
    """The public keys of a transformers config object (or of a plain namespace)."""
    to_dict = getattr(type(config), "to_dict", None)  # the class: no instance attribute read
    keys = to_dict(config) if to_dict is not None else vars(config)
    return {key for key in keys if not key.startswith("_")}


def unknown_keys(config: Any, known: frozenset[str]) -> list[str]:
    """Keys of ``config`` that are neither in ``known`` nor common to every config."""
    return sorted(config_keys(config) - known - COMMON_IGNORED_KEYS)


def warn_unknown_keys(model: str, config: Any, known: frozenset[str], where: str = "config.json") -> None:
    """Warns once per process and key set about keys of ``config`` this plugin does not know."""
    unknown = unknown_keys(config, known)
    if unknown and (model, tuple(unknown)) not in _warned:
        _warned.add((model, tuple(unknown)))
        names = ", ".join(f"`{key}`" for key in unknown)
        logger.warning(
            "%s %s has keys vllm-laguna does not know: %s. They are not read; if one changes the "
            "model, the output will differ from the reference implementation (README: Config keys).",
            model,
            where,
            names,
        )
