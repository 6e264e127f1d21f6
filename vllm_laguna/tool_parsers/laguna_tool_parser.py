"""``--tool-call-parser laguna``: Laguna's XML tool calls for vLLM's OpenAI server.

The grammar, the typing of values and the split-invariance live in
:mod:`.call_scanner`; this adapter speaks vLLM's ``ToolParser`` protocol:

- ``extract_tool_calls``: the complete output (``parse_complete``).
- ``extract_tool_calls_streaming``: one delta; the name of a call goes out as soon as it is
  complete (with the call's id, fixed for the call), then its argument fragments, string
  values as they arrive. ``prev_tool_call_arr``/``streamed_args_for_tool`` track what was
  read and sent, so that vLLM's end-of-stream step can close the JSON of a call cut off by
  ``max_tokens``.
- ``adjust_request``: keeps ``<tool_call>``/``</tool_call>`` in the decoded text
  (``skip_special_tokens=False``) whenever tools are in play, whether or not the tokenizer
  calls them special.

A Laguna-specific duty in streaming: blanks waiting to see whether they are content are
released when the turn's end token arrives in ``delta_token_ids``. A ``<think>`` block in
the text this parser sees is content (the reasoning parser decides where reasoning ends;
see :mod:`vllm_laguna.reasoning.splitter`).

Model output never makes it raise: an internal error is logged once and the text comes back
as content (:mod:`vllm_laguna.parser_errors`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from vllm.entrypoints.generate.base.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    ExtractedToolCallInformation,
    FunctionCall,
    ToolCall,
)
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
from vllm.renderers.chat_utils import make_tool_call_id
from vllm.tokenizers import TokenizerLike
from vllm.tool_parsers.abstract_tool_parser import Tool, ToolParser

from vllm_laguna.laguna_format import END_ASSISTANT, END_TOOL_CALL, TOOL_CALL
from vllm_laguna.parser_errors import FailSafe
from vllm_laguna.tool_parsers.arg_types import ArgumentSchemas
from vllm_laguna.tool_parsers.call_scanner import ScanStep, ToolCallScanner, parse_complete


class LagunaToolParser(ToolParser):
    """Tool calls of Laguna models (``<tool_call>name\\n<arg_key>..</arg_key>\\n<arg_value>..
    </arg_value>\\n</tool_call>``). One instance per request."""

    # required/named tool_choice: vLLM's JSON-forcing path would make the model write JSON
    # instead of its XML; parse what the model writes instead
    supports_required_and_named = False

    def __init__(self, tokenizer: TokenizerLike, tools: list[Tool] | None = None):
        super().__init__(tokenizer, tools)
        missing = [m for m in (TOOL_CALL, END_TOOL_CALL) if m not in self.vocab]
        if missing:
            raise ValueError(f"the Laguna tool parser needs single tokens for {missing} in the tokenizer")
        end_ids = {self.vocab.get(END_ASSISTANT), getattr(tokenizer, "eos_token_id", None)}
        self._end_of_turn_ids = frozenset(i for i in end_ids if isinstance(i, int))
        self._scanner: ToolCallScanner | None = None
        self._call_ids: list[str] = []
        self._fail_safe = FailSafe(type(self).__name__)

    def adjust_request(
        self, request: ChatCompletionRequest | ResponsesRequest
    ) -> ChatCompletionRequest | ResponsesRequest:
        request = super().adjust_request(request)
        if request.tools and request.tool_choice != "none":
            request.skip_special_tokens = False
        return request

    def _schemas(self, request: Any) -> ArgumentSchemas:
        return ArgumentSchemas(getattr(request, "tools", None) or self.tools)

    def extract_tool_calls(self, model_output: str, request: ChatCompletionRequest) -> ExtractedToolCallInformation:
        try:
            content, calls = parse_complete(model_output, self._schemas(request))
        except Exception:
            self._fail_safe.record("extract_tool_calls")
            calls = []
        if not calls:
            return ExtractedToolCallInformation(tools_called=False, tool_calls=[], content=model_output)
        tool_calls = [
            ToolCall(function=FunctionCall(name=call.name, arguments=json.dumps(call.arguments, ensure_ascii=False)))
            for call in calls
        ]
        return ExtractedToolCallInformation(tools_called=True, tool_calls=tool_calls, content=content)

    def extract_tool_calls_streaming(
        self,
        previous_text: str,
        current_text: str,
        delta_text: str,
        previous_token_ids: Sequence[int],
        current_token_ids: Sequence[int],
        delta_token_ids: Sequence[int],
        request: ChatCompletionRequest,
    ) -> DeltaMessage | None:
        if not self._fail_safe.failed:
            try:
                return self._delta(self._scan(delta_text, delta_token_ids, request))
            except Exception:
                self._fail_safe.record("extract_tool_calls_streaming")
        return DeltaMessage(content=delta_text) if delta_text else None

    def _scan(self, delta_text: str, delta_token_ids: Sequence[int], request: Any) -> ScanStep:
        if self._scanner is None:
            self._scanner = ToolCallScanner(self._schemas(request))
        # deltas of whole tokens never split <tool_call> (one token); bare text may
        step = self._scanner.feed(delta_text, hold_partial=not delta_token_ids)
        if self._end_of_turn_ids.intersection(delta_token_ids):
            finished = self._scanner.finish()
            step.content.extend(finished.content)
            step.calls.extend(finished.calls)
        return step

    def _delta(self, step: ScanStep) -> DeltaMessage | None:
        assert self._scanner is not None
        deltas: dict[int, DeltaToolCall] = {}
        for index, name, fragment in step.calls:
            delta = deltas.get(index)
            if delta is None:
                delta = deltas[index] = DeltaToolCall(index=index, function=DeltaFunctionCall(arguments=""))
            if name is not None:
                self._call_ids.append(make_tool_call_id())
                delta.id, delta.type = self._call_ids[index], "function"
                delta.function.name = name
                self.current_tool_id, self.current_tool_name_sent = index, True
            delta.function.arguments += fragment
        for index in deltas:
            call = self._scanner.calls[index]
            record = {"name": call.name, "arguments": call.arguments}
            if index < len(self.prev_tool_call_arr):
                self.prev_tool_call_arr[index] = record
                self.streamed_args_for_tool[index] = call.arguments_json
            else:
                self.prev_tool_call_arr.append(record)
                self.streamed_args_for_tool.append(call.arguments_json)
        content = "".join(step.content)
        if not (content or deltas):
            return None
        return DeltaMessage(content=content or None, tool_calls=list(deltas.values()))
