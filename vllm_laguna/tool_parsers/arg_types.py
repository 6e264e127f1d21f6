"""Argument values of Laguna tool calls, typed by the request's tool schema.

Values arrive as text between ``<arg_value>`` and ``</arg_value>``. A parameter whose
schema says ``string`` keeps that text exactly (newlines, markup, ``<``, unicode). Any other
(or unknown) parameter is read as JSON, else as a Python literal (``True``, ``'a'``,
``(1, 2)``), else kept as the raw text. Values must survive ``json.dumps`` as strict JSON:
``NaN``, ``1e400`` or a set stay raw text.
"""

from __future__ import annotations

import ast
import json
import warnings
from collections.abc import Iterable
from typing import Any


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _as_strict_json(value: Any) -> Any:
    """``value`` as JSON would give it back (tuples become lists); ValueError if it has no
    strict JSON form."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError, RecursionError) as e:
        raise ValueError("no strict JSON form") from e


def typed_value(text: str) -> Any:
    """A non-string argument: JSON, then a Python literal, then the raw text."""
    stripped = text.strip()
    try:
        return _as_strict_json(json.loads(stripped, parse_constant=_reject_constant))
    except (ValueError, RecursionError):
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SyntaxWarning)
            return _as_strict_json(ast.literal_eval(stripped))
    except Exception:  # literal_eval raises many kinds on arbitrary text
        pass
    return text


def _schema_is_string(schema: Any) -> bool:
    """True when every value the schema admits (``null`` aside) is a string."""
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind == "string"
    if isinstance(kind, list):
        kinds = {k for k in kind if k != "null"}
        return kinds == {"string"}
    if "enum" in schema:
        return bool(schema["enum"]) and all(isinstance(v, str) for v in schema["enum"])
    if "const" in schema:
        return isinstance(schema["const"], str)
    options = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(options, list) and options:
        typed = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")]
        return bool(typed) and all(_schema_is_string(o) for o in typed)
    return False


class ArgumentSchemas:
    """Which parameters of which tools are strings, from the request's ``tools``."""

    def __init__(self, tools: Iterable[Any] | None):
        self._string_params: dict[str, set[str]] = {}
        for tool in tools or ():
            # chat completions nest under .function; the Responses API's FunctionTool is flat
            function = getattr(tool, "function", tool)
            name = getattr(function, "name", None)
            parameters = getattr(function, "parameters", None)
            if not isinstance(name, str) or not isinstance(parameters, dict):
                continue
            properties = parameters.get("properties")
            if isinstance(properties, dict):
                self._string_params[name] = {k for k, v in properties.items() if _schema_is_string(v)}

    def is_string(self, tool_name: str, key: str) -> bool:
        return key in self._string_params.get(tool_name, ())
