"""Incremental split of Laguna output text into reasoning and content.

The reasoning of a turn is the one block it starts with. With thinking on, the chat template
ends the prompt with ``<think>``, so the output starts inside the reasoning (a ``<think>`` the
model repeats right at the start is dropped); it ends at the first ``</think>`` (dropped) or,
implicitly, where a ``<tool_call>`` begins (kept: the call belongs to the tool parser).
Everything after that is content, and with thinking off (the prompt ends with ``</think>``)
the whole output is: a ``<think>`` block the model opens later is content, as written.

That rule is what vLLM's serving layer can stream: it stops calling the reasoning parser for
the rest of the output once the prompt or a delta has ended the reasoning, so a block opened
after that point could only reach the client as content. The complete response follows the
same rule, so one request gets one answer, streamed or not.

The splitter only decides on text it has seen: fed the same text in any pieces, it produces
the same concatenated reasoning and content. When a piece may end inside a marker (text
arriving without token boundaries) the undecided tail is held back until the next piece or
:meth:`finish`; deltas of whole tokens never split a marker, which are single tokens.
"""

from __future__ import annotations

from vllm_laguna.laguna_format import END_THINK, THINK, TOOL_CALL, first_of, partial_suffix


class ReasoningSplitter:
    """Routes text pieces to reasoning or content; one instance per output."""

    def __init__(self, thinking: bool):
        self._in_reasoning = thinking
        #: nothing seen yet inside the reasoning: a repeated ``<think>`` is dropped
        self._at_start = thinking
        self._held = ""

    @property
    def ended(self) -> bool:
        """True once the text has left the reasoning (or never was in it)."""
        return not self._in_reasoning

    def feed(self, text: str, *, hold_partial: bool = True) -> tuple[str, str]:
        """Consume ``text``; return the (reasoning, content) it decides.

        ``hold_partial``: the piece may end inside a marker, so keep such a tail back.
        """
        buf, self._held = self._held + text, ""
        if not self._in_reasoning:
            return "", buf
        if self._at_start and buf:
            if buf.startswith(THINK):
                buf = buf[len(THINK) :]
                self._at_start = False
            elif hold_partial and THINK.startswith(buf):
                self._held = buf
                return "", ""
            else:
                self._at_start = False
        end = first_of(buf, END_THINK, TOOL_CALL)
        if end is None:
            keep = partial_suffix(buf, END_THINK, TOOL_CALL) if hold_partial else 0
            self._held = buf[len(buf) - keep :]
            return buf[: len(buf) - keep], ""
        index, marker = end
        self._in_reasoning = False
        content = buf[index + len(END_THINK) :] if marker == END_THINK else buf[index:]
        return buf[:index], content

    def finish(self) -> tuple[str, str]:
        """The output is complete: release the held tail, as (reasoning, content)."""
        held, self._held = self._held, ""
        return (held, "") if self._in_reasoning else ("", held)
