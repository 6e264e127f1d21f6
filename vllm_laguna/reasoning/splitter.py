"""Incremental split of Laguna output text into reasoning and content.

With thinking on, the chat template ends the prompt with ``<think>``, so the output starts
inside the reasoning; it ends at ``</think>`` (dropped) or, implicitly, where a
``<tool_call>`` begins (kept: the call belongs to the tool parser, and everything after it
is content). With thinking off the prompt ends with ``</think>``: the output is content,
unless the model opens a ``<think>`` of its own before any non-blank text; likewise right
after a ``</think>``, blanks and then a ``<think>`` continue the reasoning. Blanks stay
content, wherever they are: nothing waits to see what follows them.

The splitter only decides on text it has seen: fed the same text in any pieces, it produces
the same concatenated reasoning and content. When a piece may end inside a marker (text
arriving without token boundaries) the undecided tail is held back until the next piece or
:meth:`finish`; deltas of whole tokens never split a marker, which are single tokens.
"""

from __future__ import annotations

import enum

from vllm_laguna.laguna_format import END_THINK, THINK, TOOL_CALL, first_of, partial_suffix


class Phase(enum.Enum):
    #: only blanks since the start (thinking off) or since a ``</think>``: a ``<think>``
    #: may still (re)open the reasoning
    OPENING = "opening"
    REASONING = "reasoning"
    #: the rest is content
    CONTENT = "content"


class ReasoningSplitter:
    """Routes text pieces to reasoning or content; one instance per output."""

    def __init__(self, thinking: bool):
        self.phase = Phase.REASONING if thinking else Phase.OPENING
        self._closed_a_block = False
        self._at_start = thinking
        self._held = ""

    @property
    def ended(self) -> bool:
        """True when the text so far has left the reasoning: content has begun, or a block
        has ended and no other has opened (yet)."""
        return self.phase is Phase.CONTENT or (self.phase is Phase.OPENING and self._closed_a_block)

    def feed(self, text: str, *, hold_partial: bool = True) -> tuple[str, str]:
        """Consume ``text``; return the (reasoning, content) it decides.

        ``hold_partial``: the piece may end inside a marker, so keep such a tail back.
        """
        buf, self._held = self._held + text, ""
        reasoning: list[str] = []
        content: list[str] = []
        while buf:
            if self.phase is Phase.CONTENT:
                content.append(buf)
                break
            if self.phase is Phase.OPENING:
                body = buf.lstrip()
                content.append(buf[: len(buf) - len(body)])
                buf = body
                if not buf:
                    break
                if buf.startswith(THINK):
                    buf = buf[len(THINK) :]
                    self.phase = Phase.REASONING
                elif hold_partial and THINK.startswith(buf):
                    self._held = buf
                    break
                else:
                    self.phase = Phase.CONTENT
                continue
            # Phase.REASONING; a <think> of the model's own right at the start is no reasoning
            if self._at_start:
                if buf.startswith(THINK):
                    buf = buf[len(THINK) :]
                    self._at_start = False
                    continue
                if hold_partial and THINK.startswith(buf):
                    self._held = buf
                    break
                self._at_start = False
            end = first_of(buf, END_THINK, TOOL_CALL)
            if end is None:
                keep = partial_suffix(buf, END_THINK, TOOL_CALL) if hold_partial else 0
                reasoning.append(buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                break
            index, marker = end
            reasoning.append(buf[:index])
            buf = buf[index + len(END_THINK) :] if marker == END_THINK else buf[index:]
            self.phase = Phase.OPENING if marker == END_THINK else Phase.CONTENT
            self._closed_a_block = True
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """The output is complete: release the held tail, as (reasoning, content)."""
        held, self._held = self._held, ""
        return (held, "") if self.phase is Phase.REASONING else ("", held)
