"""``--reasoning-parser laguna``: reasoning of Laguna models for vLLM's OpenAI server.

Two consumers call it. The serving layer (through vLLM's ``DelegatingParser``) asks
``is_reasoning_end(prompt)`` once; if the prompt left the reasoning open it feeds every
delta to ``extract_reasoning_streaming`` until ``is_reasoning_end_streaming`` says the
reasoning is over, then hands the rest (the returned content, ``extract_content_ids``) to
the tool parser. Non-streaming responses go through ``extract_reasoning``. The engine core
builds its own instance per structured-output request and calls only the
``is_reasoning_end*`` methods, on token ids, to decide where the grammar starts to apply.

Where the reasoning ends, as FACTS.md describes XS.2: at ``</think>``, or implicitly where a
``<tool_call>`` begins (vLLM's in-tree ``poolside_v1`` misses this and swallows the call
into the reasoning). The text rules live in :mod:`.splitter`. Looking back for the state of
a prompt stops at the current ``<assistant>``: a ``</think>`` of an earlier turn, or the
``<tool_call>`` example of the tools section, says nothing about this turn.

Thinking on or off: the prompt says it where the parser sees the prompt (streaming); else
``chat_template_kwargs["enable_thinking"]`` (the server passes the effective kwargs, a
request may carry its own, ``reasoning_effort`` implies it); else what the tokenizer's chat
template does by default, read once by rendering a one-message conversation. With thinking
off the prompt closes the reasoning, so the serving layer never calls this parser for the
output; a ``<think>`` the model opens itself is then routed by the tool parser.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from vllm.entrypoints.generate.base.protocol import DeltaMessage
from vllm.reasoning.abs_reasoning_parsers import ReasoningParser

from vllm_laguna.laguna_format import ASSISTANT, END_THINK, THINK, TOOL_CALL
from vllm_laguna.parser_errors import FailSafe
from vllm_laguna.reasoning.splitter import ReasoningSplitter

if TYPE_CHECKING:
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.tokenizers import TokenizerLike

#: markers whose text the parsers must see; the tokenizer may call them special
_TEXT_MARKERS = (THINK, END_THINK, TOOL_CALL)


class LagunaReasoningParser(ReasoningParser):
    """Splits Laguna output into ``reasoning`` and ``content`` (the tool calls stay in
    ``content`` for the tool parser). One instance per request."""

    def __init__(self, tokenizer: TokenizerLike, *args, **kwargs):
        super().__init__(tokenizer, *args, **kwargs)
        missing = [m for m in (THINK, END_THINK, TOOL_CALL, ASSISTANT) if m not in self.vocab]
        if missing:
            raise ValueError(f"the Laguna reasoning parser needs single tokens for {missing} in the tokenizer")
        self._think_id = self.vocab[THINK]
        self._assistant_id = self.vocab[ASSISTANT]
        self._end_think_id = self.vocab[END_THINK]
        self._tool_call_id = self.vocab[TOOL_CALL]
        #: after either of these the current turn's reasoning is over
        self._end_ids = frozenset((self._end_think_id, self._tool_call_id))
        self._configured_thinking = _enable_thinking(kwargs.get("chat_template_kwargs"))
        self._thinking = (
            self._configured_thinking if self._configured_thinking is not None else template_thinks(tokenizer)
        )
        self._markers_special = any(is_special_token(tokenizer, m) for m in _TEXT_MARKERS)
        self._stream = ReasoningSplitter(self._thinking)
        self._stream_started = False
        self._fail_safe = FailSafe(type(self).__name__)

    @property
    def reasoning_start_str(self) -> str:
        return THINK

    @property
    def reasoning_end_str(self) -> str:
        return END_THINK

    # -- token ids: the engine core's structured-output gate and the serving layer --

    def _turn_marker(self, input_ids: Sequence[int]) -> int | None:
        """The last reasoning marker of the current assistant turn, or None."""
        for token_id in reversed(input_ids):
            if token_id in self._end_ids or token_id == self._think_id:
                return token_id
            if token_id == self._assistant_id:
                return None
        return None

    def is_reasoning_end(self, input_ids: Sequence[int]) -> bool:
        marker = self._turn_marker(input_ids)
        if marker is None:  # the turn has no marker yet: reasoning only if thinking is on
            return not self._thinking
        return marker != self._think_id

    def is_reasoning_end_streaming(self, input_ids: Sequence[int], delta_ids: Iterable[int]) -> bool:
        # The serving layer asks right after extract_reasoning_streaming: the text decides
        # (a parser that failed has passed the rest on as content). The engine core's
        # instance sees no text: the delta's ids decide; it stops asking once True.
        if self._stream_started:
            return self._stream_over
        return any(token_id in self._end_ids for token_id in delta_ids)

    @property
    def _stream_over(self) -> bool:
        return self._fail_safe.failed or self._stream.ended

    def extract_content_ids(self, input_ids: list[int]) -> list[int]:
        for i, token_id in enumerate(input_ids):
            if token_id == self._tool_call_id:  # the call is content, for the tool parser
                return list(input_ids[i:])
            if token_id == self._end_think_id:
                return list(input_ids[i + 1 :])
        return list(input_ids) if self._stream_over else []

    def count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        try:
            return self._count_reasoning_tokens(token_ids)
        except Exception:
            self._fail_safe.record("count_reasoning_tokens")
            return 0

    def _count_reasoning_tokens(self, token_ids: Sequence[int]) -> int:
        # the splitter's rule, on token ids (the markers are single tokens)
        if not self._thinking:
            return 0
        for i, token_id in enumerate(token_ids):
            if token_id in self._end_ids:
                return i - int(token_ids[0] == self._think_id)
        return len(token_ids) - int(bool(token_ids) and token_ids[0] == self._think_id)

    def adjust_initial_state_from_prompt(self, prompt_token_ids: Sequence[int]) -> None:
        """The prompt is the best witness of the thinking mode: a turn it leaves open with
        ``<think>`` starts in the reasoning whatever the kwargs say."""
        if self._stream_started:
            return
        marker = self._turn_marker(prompt_token_ids)
        if marker is not None:
            self._thinking = marker == self._think_id
            self._stream = ReasoningSplitter(self._thinking)

    def adjust_request(
        self, request: ChatCompletionRequest | ResponsesRequest
    ) -> ChatCompletionRequest | ResponsesRequest:
        # the parsers read the markers from the decoded text: keep them if they are special
        if self._markers_special and hasattr(request, "skip_special_tokens"):
            request.skip_special_tokens = False
        return request

    # -- text --

    def extract_reasoning(
        self, model_output: str, request: ChatCompletionRequest | ResponsesRequest
    ) -> tuple[str | None, str | None]:
        try:
            splitter = ReasoningSplitter(self._thinking_for(request))
            reasoning, content = splitter.feed(model_output)
            tail_reasoning, tail_content = splitter.finish()
        except Exception:
            self._fail_safe.record("extract_reasoning")
            return None, model_output or None
        return (reasoning + tail_reasoning) or None, (content + tail_content) or None

    def extract_reasoning_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
    ) -> DeltaMessage | None:
        self._stream_started = True
        reasoning, content = "", delta_text
        if not self._fail_safe.failed:
            try:
                # deltas of whole tokens never split a marker (each is one token); bare text may
                reasoning, content = self._stream.feed(delta_text, hold_partial=not delta_token_ids)
            except Exception:
                self._fail_safe.record("extract_reasoning_streaming")
        if not reasoning and not content:
            return None
        return DeltaMessage(reasoning=reasoning or None, content=content or None)

    def _thinking_for(self, request: Any) -> bool:
        if self._configured_thinking is not None:
            return self._configured_thinking
        from_request = _enable_thinking(getattr(request, "chat_template_kwargs", None))
        if from_request is not None:
            return from_request
        effort = getattr(request, "reasoning_effort", None)
        if isinstance(effort, str):  # vLLM renders enable_thinking = effort != "none"
            return effort != "none"
        return self._thinking


def _enable_thinking(chat_template_kwargs: dict[str, Any] | None) -> bool | None:
    value = (chat_template_kwargs or {}).get("enable_thinking")
    return None if value is None else bool(value)


@functools.lru_cache(maxsize=16)
def template_thinks(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template opens the reasoning (ends the generation
    prompt with ``<think>``) when ``enable_thinking`` is not given."""
    try:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": "?"}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # no template, or one that needs more than a user message
        return False
    return isinstance(rendered, str) and rendered.rstrip().endswith(THINK)


def is_special_token(tokenizer: Any, token: str) -> bool:
    """Whether decoding with ``skip_special_tokens=True`` drops ``token``."""
    for added in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if str(added) == token:
            return bool(getattr(added, "special", False))
    return token in getattr(tokenizer, "all_special_tokens", ())
