"""Config-validation error and the small field readers the per-model parsers share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A checkpoint config field is missing or malformed.

    The message always names the field (as it appears in ``config.json``) and the
    expected value, e.g. ``layer_types: expected a list of num_hidden_layers=4 entries``.
    """

    def __init__(self, model: str, field: str, expected: str, got: Any = None):
        self.field = field
        got_text = "" if got is None else f" (got {got!r})"
        super().__init__(f"{model} config field `{field}`: expected {expected}{got_text}")


def positive_int(model: str, config: Any, field: str, default: Any = None) -> int:
    """Read ``config.<field>`` as an int > 0."""
    value = getattr(config, field, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(model, field, "a positive integer", value)
    return value


def per_layer_list(
    model: str,
    field: str,
    value: Any,
    num_layers: int,
    allowed: Iterable[Any] | None = None,
) -> tuple:
    """Check a per-layer list: right length and, if given, values from ``allowed``."""
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ConfigError(model, field, f"a list of num_hidden_layers={num_layers} entries", value)
    if len(value) != num_layers:
        raise ConfigError(
            model, field, f"a list of num_hidden_layers={num_layers} entries", f"{len(value)} entries"
        )
    if allowed is not None:
        allowed = tuple(allowed)
        for i, item in enumerate(value):
            if item not in allowed:
                raise ConfigError(model, f"{field}[{i}]", f"one of {list(allowed)}", item)
    return tuple(value)
