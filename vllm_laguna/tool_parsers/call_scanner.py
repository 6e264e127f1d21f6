"""Incremental scanner of Laguna's XML tool calls (GLM-4.5-like), for streamed and complete
output alike.

Format (FACTS.md)::

    <tool_call>get_weather
    <arg_key>city</arg_key>
    <arg_value>Paris</arg_value>
    <arg_key>days</arg_key>
    <arg_value>3</arg_value>
    </tool_call>

The scanner is a state machine over text pieces. It acts only on what the text seen so far
decides and holds back an undecided tail (a prefix of a tag, an unfinished name or value),
so any split of the same text yields the same content and the same calls; the complete
parse (:func:`parse_complete`) is the same machine fed everything at once. What it emits:

- content: text outside calls. A gap holding only blanks next to a call (the ``\\n`` between
  two calls, or before the first) is formatting, not content.
- a call, announced as soon as its name is complete (the name must look like one: no
  blanks, quotes or brackets; else the whole block is content);
- argument fragments whose concatenation is ``json.dumps(arguments, ensure_ascii=False)``:
  ``{"key": `` and the value; string values (per the tool schema) stream chunk by chunk as
  they arrive, other values once complete (typed by :mod:`.arg_types`).

Nothing is dropped: text inside a call that is not part of the grammar (stray words, an
argument without a value, a repeated key) goes to content as it was written.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from typing import Any

from vllm_laguna.laguna_format import (
    ARG_KEY,
    ARG_VALUE,
    END_ARG_KEY,
    END_ARG_VALUE,
    END_TOOL_CALL,
    TOOL_CALL,
    first_of,
    partial_suffix,
)
from vllm_laguna.tool_parsers.arg_types import ArgumentSchemas, typed_value

#: a function name: no blanks, quotes, brackets or separators
_NAME = re.compile(r"[^\s<>{}\[\]()\"'`,;]+")
#: longest name or key waited for before the block counts as malformed
_MAX_NAME = 256
#: tags that end the body's free text
_BODY_TAGS = (ARG_KEY, END_TOOL_CALL, TOOL_CALL)
#: tags that cut a key short (the key never got its ``</arg_key>``)
_KEY_BREAKERS = (ARG_KEY, ARG_VALUE, END_TOOL_CALL, TOOL_CALL)


class _State(enum.Enum):
    TEXT = "text"  # outside calls
    NAME = "name"  # after <tool_call>, before the name's end
    MALFORMED = "malformed"  # a block that is no call: content up to </tool_call>
    BODY = "body"  # between arguments
    KEY = "key"  # after <arg_key>
    AFTER_KEY = "after_key"  # after </arg_key>, waiting for <arg_value>
    STRING_VALUE = "string_value"  # a string value, streamed as it comes
    VALUE = "value"  # any other value, typed once complete
    RAW_VALUE = "raw_value"  # a repeated key's value: content


@dataclass
class ScannedCall:
    """A tool call; ``arguments`` holds what has been read so far."""

    name: str = ""
    index: int = -1
    arguments: dict[str, Any] = field(default_factory=dict)
    #: the argument fragments emitted so far, concatenated
    arguments_json: str = ""
    complete: bool = False
    #: amount of content emitted before the call began, and the blanks dropped before it
    content_mark: int = 0
    dropped_blanks: str = ""
    #: the call's text consumed so far, from ``<tool_call>``
    raw: str = ""


@dataclass
class ScanStep:
    """What one piece of text decided: content, and (call index, name if the call is new,
    argument fragment) in order."""

    content: list[str] = field(default_factory=list)
    calls: list[tuple[int, str | None, str]] = field(default_factory=list)


class _BlankGap:
    """Text between two structural points: blanks wait until non-blank text shows the gap
    is content; at the next structure they are dropped."""

    def __init__(self) -> None:
        self.pending = ""
        self.has_text = False

    def feed(self, text: str) -> str:
        if self.has_text:
            return text
        if text.strip():
            out, self.pending, self.has_text = self.pending + text, "", True
            return out
        self.pending += text
        return ""

    def close(self) -> str:
        dropped, self.pending, self.has_text = self.pending, "", False
        return dropped


class ToolCallScanner:
    """One per output. :meth:`feed` pieces, then :meth:`finish` when the output is over."""

    def __init__(self, schemas: ArgumentSchemas):
        self._schemas = schemas
        self._state = _State.TEXT
        self._buf = ""
        self._hold = True
        self._step = ScanStep()
        self._text_gap = _BlankGap()
        self._body_gap = _BlankGap()
        self._call: ScannedCall | None = None
        self._arg_raw = ""
        self._key = ""
        self._value = ""
        #: announced calls, in order
        self.calls: list[ScannedCall] = []
        #: all content emitted
        self.content: list[str] = []
        self._content_len = 0

    @property
    def open_call(self) -> ScannedCall | None:
        """The announced call still waiting for its ``</tool_call>``."""
        call = self._call
        return call if call is not None and call.index >= 0 else None

    def feed(self, text: str, *, hold_partial: bool = True) -> ScanStep:
        """Consume ``text``. ``hold_partial=False`` says the pieces are whole tokens, so a
        single-token marker (``<tool_call>``) is never split and content need not wait."""
        self._step, self._hold = ScanStep(), hold_partial
        self._buf += text
        while self._buf and self._advance():
            pass
        return self._step

    def finish(self) -> ScanStep:
        """The output is over: release what waited for more text."""
        self._step, self._hold = ScanStep(), False
        while self._buf and self._advance():
            pass
        rest, self._buf = self._buf, ""
        call = self._call
        if call is not None:
            call.raw += rest
        if self._state is _State.NAME and call is not None:  # never announced: plain text
            self._emit(call.dropped_blanks + call.raw)
            self._call, self._state = None, _State.TEXT
        elif self._state is _State.STRING_VALUE:
            self._string_chunk(rest)
        if not any(c.complete for c in self.calls):
            self._emit(self._text_gap.close())
        return self._step

    # -- plumbing --

    def _take(self, n: int) -> str:
        taken, self._buf = self._buf[:n], self._buf[n:]
        if self._call is not None:
            self._call.raw += taken
        return taken

    def _emit(self, text: str) -> None:
        if text:
            self.content.append(text)
            self._step.content.append(text)
            self._content_len += len(text)

    def _fragment(self, fragment: str) -> None:
        call = self._call
        assert call is not None
        call.arguments_json += fragment
        self._step.calls.append((call.index, None, fragment))

    def _key_prefix(self) -> str:
        call = self._call
        assert call is not None
        return ("{" if not call.arguments else ", ") + json.dumps(self._key, ensure_ascii=False) + ": "

    def _advance(self) -> bool:
        """One step in the current state; False when it must wait for more text."""
        return _HANDLERS[self._state](self)

    # -- states --

    def _on_text(self) -> bool:
        buf = self._buf
        start = buf.find(TOOL_CALL)
        if start < 0:
            keep = partial_suffix(buf, TOOL_CALL) if self._hold else 0
            self._emit(self._text_gap.feed(self._take(len(buf) - keep)))
            return False
        self._emit(self._text_gap.feed(self._take(start)))
        self._call = ScannedCall(content_mark=self._content_len, dropped_blanks=self._text_gap.close())
        self._take(len(TOOL_CALL))
        self._state = _State.NAME
        return True

    def _on_name(self) -> bool:
        blanks = len(self._buf) - len(self._buf.lstrip())
        self._take(blanks)
        buf = self._buf
        ends = [i for i in (buf.find("\n"), buf.find("<")) if i >= 0]
        if not ends:
            if len(buf.rstrip()) <= _MAX_NAME:  # the name is stripped once it ends
                return False
            self._malformed()
            return True
        end = min(ends)
        name = buf[:end].strip()
        self._take(end + 1 if buf[end] == "\n" else end)
        if len(name) > _MAX_NAME or not _NAME.fullmatch(name):
            self._malformed()
            return True
        call = self._call
        assert call is not None
        call.name, call.index = name, len(self.calls)
        self.calls.append(call)
        self._step.calls.append((call.index, name, ""))
        self._body_gap.close()
        self._state = _State.BODY
        return True

    def _malformed(self) -> None:
        call = self._call
        assert call is not None
        self._call = None
        self._emit(self._text_gap.feed(call.dropped_blanks + call.raw))
        self._state = _State.MALFORMED

    def _on_malformed(self) -> bool:
        buf = self._buf
        found = first_of(buf, END_TOOL_CALL, TOOL_CALL)
        if found is None:
            keep = partial_suffix(buf, END_TOOL_CALL, TOOL_CALL) if self._hold else 0
            self._emit(self._take(len(buf) - keep))
            return False
        index, tag = found
        self._emit(self._take(index + len(tag) if tag == END_TOOL_CALL else index))
        self._state = _State.TEXT
        return True

    def _on_body(self) -> bool:
        buf = self._buf
        lt = buf.find("<")
        if lt != 0:
            self._emit(self._body_gap.feed(self._take(len(buf) if lt < 0 else lt)))
            return lt > 0
        if buf.startswith(ARG_KEY):
            self._body_gap.close()
            self._arg_raw = self._take(len(ARG_KEY))
            self._state = _State.KEY
        elif buf.startswith(END_TOOL_CALL):
            self._body_gap.close()
            self._take(len(END_TOOL_CALL))
            self._close_call()
        elif buf.startswith(TOOL_CALL):  # the next call began without closing this one
            self._body_gap.close()
            self._close_call()
        elif any(tag.startswith(buf) for tag in _BODY_TAGS):
            return False
        else:
            self._emit(self._body_gap.feed(self._take(1)))
        return True

    def _close_call(self) -> None:
        call = self._call
        assert call is not None
        self._fragment("}" if call.arguments else "{}")
        call.complete = True
        self._call = None
        self._text_gap.close()
        self._state = _State.TEXT

    def _bad_argument(self, n: int) -> None:
        """The argument begun at ``<arg_key>`` is not one: its text (and ``n`` more
        characters) is content; scanning resumes in the body."""
        self._emit(self._body_gap.feed(self._arg_raw + self._take(n)))
        self._arg_raw = ""
        self._state = _State.BODY

    def _on_key(self) -> bool:
        buf = self._buf
        found = first_of(buf, END_ARG_KEY, *_KEY_BREAKERS)
        if found is None:
            undecided = len(buf) - partial_suffix(buf, END_ARG_KEY, *_KEY_BREAKERS)
            if len(buf[:undecided].strip()) <= _MAX_NAME:  # the key is stripped once it ends
                return False
            self._bad_argument(undecided)
            return True
        index, tag = found
        if tag != END_ARG_KEY:
            self._bad_argument(index)
            return True
        key = buf[:index].strip()
        self._arg_raw += self._take(index + len(END_ARG_KEY))
        if not key or len(key) > _MAX_NAME:
            self._bad_argument(0)
            return True
        self._key = key
        self._state = _State.AFTER_KEY
        return True

    def _on_after_key(self) -> bool:
        self._arg_raw += self._take(len(self._buf) - len(self._buf.lstrip()))
        buf = self._buf
        if not buf:
            return False
        if not buf.startswith(ARG_VALUE):
            if ARG_VALUE.startswith(buf):
                return False
            self._bad_argument(0)
            return True
        self._arg_raw += self._take(len(ARG_VALUE))
        call = self._call
        assert call is not None
        self._value = ""
        if self._key in call.arguments:  # a repeated key: the first value stands
            self._emit(self._body_gap.feed(self._arg_raw))
            self._state = _State.RAW_VALUE
        elif self._schemas.is_string(call.name, self._key):
            self._fragment(self._key_prefix() + '"')
            call.arguments[self._key] = ""
            self._state = _State.STRING_VALUE
        else:
            self._state = _State.VALUE
        self._arg_raw = ""
        return True

    def _string_chunk(self, text: str) -> None:
        call = self._call
        assert call is not None
        if text:
            call.arguments[self._key] += text
            self._fragment(json.dumps(text, ensure_ascii=False)[1:-1])

    def _value_end(self) -> tuple[str, bool]:
        """The value text up to ``</arg_value>`` (consumed), and whether it ended; an
        unfinished value gives what is safe to consume, minus a possible partial tag."""
        buf = self._buf
        end = buf.find(END_ARG_VALUE)
        if end < 0:
            return self._take(len(buf) - partial_suffix(buf, END_ARG_VALUE)), False
        text = self._take(end)
        self._take(len(END_ARG_VALUE))
        return text, True

    def _on_string_value(self) -> bool:
        text, ended = self._value_end()
        self._string_chunk(text)
        if ended:
            self._fragment('"')
            self._state = _State.BODY
        return ended

    def _on_value(self) -> bool:
        text, ended = self._value_end()
        self._value += text
        if ended:
            call = self._call
            assert call is not None
            value = typed_value(self._value)
            self._fragment(self._key_prefix() + json.dumps(value, ensure_ascii=False))
            call.arguments[self._key] = value
            self._state = _State.BODY
        return ended

    def _on_raw_value(self) -> bool:
        text, ended = self._value_end()
        self._emit(self._body_gap.feed(text + (END_ARG_VALUE if ended else "")))
        if ended:
            self._state = _State.BODY
        return ended


_HANDLERS = {
    _State.TEXT: ToolCallScanner._on_text,
    _State.NAME: ToolCallScanner._on_name,
    _State.MALFORMED: ToolCallScanner._on_malformed,
    _State.BODY: ToolCallScanner._on_body,
    _State.KEY: ToolCallScanner._on_key,
    _State.AFTER_KEY: ToolCallScanner._on_after_key,
    _State.STRING_VALUE: ToolCallScanner._on_string_value,
    _State.VALUE: ToolCallScanner._on_value,
    _State.RAW_VALUE: ToolCallScanner._on_raw_value,
}


def parse_complete(text: str, schemas: ArgumentSchemas) -> tuple[str | None, list[ScannedCall]]:
    """The whole output at once: (content, complete calls).

    Without a complete call the content is ``text`` itself. A call cut off by the end of
    the output is no call: its text returns to the content."""
    scanner = ToolCallScanner(schemas)
    scanner.feed(text)
    scanner.finish()
    calls = [call for call in scanner.calls if call.complete]
    if not calls:
        return text or None, []
    content = "".join(scanner.content)
    cut = scanner.open_call
    if cut is not None:
        content = content[: cut.content_mark] + cut.dropped_blanks + cut.raw
    return (content if content.strip() else None), calls
