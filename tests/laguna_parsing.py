"""Helpers for the Laguna parser tests: the tiny tokenizer, token deltas as vLLM's
detokenizer produces them, and the parsers driven the way vLLM's OpenAI server drives them
(``ParserManager`` composes our two parsers into its ``DelegatingParser``; complete outputs
go through ``parse``, streams through ``parse_delta``)."""

from __future__ import annotations

import functools
import itertools
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from vllm_laguna.laguna_format import END_ASSISTANT

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "when": {"type": ["string", "null"]},
                    "options": {"type": "object"},
                    "hours": {"type": "array", "items": {"type": "integer"}},
                    "metric": {"type": "boolean"},
                },
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "write_file",
            "description": "Write a file.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "content": {"type": "string"}, "mode": {"enum": ["w", "a"]}},
            },
        },
    },
]

_keep: list[tempfile.TemporaryDirectory] = []


@functools.lru_cache(maxsize=2)
def tiny_tokenizer(special_markers: bool = False):
    """The tiny Laguna tokenizer, wrapped as vLLM wraps a loaded HF tokenizer.
    ``special_markers``: whether ``<think>``/``</think>``/``<tool_call>``/``</tool_call>``
    are special tokens."""
    from transformers import AutoTokenizer
    from vllm.tokenizers.hf import get_cached_tokenizer

    from vllm_laguna.tiny.tokenizer import build_tokenizer

    tmp = tempfile.TemporaryDirectory(prefix="laguna-tok-")
    _keep.append(tmp)
    build_tokenizer(tmp.name, 512, special_markers=special_markers)
    return get_cached_tokenizer(AutoTokenizer.from_pretrained(tmp.name))


def token_deltas(tokenizer, text: str) -> list[tuple[str, list[int]]]:
    """``text`` as the model would stream it: one (delta text, [token id]) per token, the
    text as vLLM's incremental detokenizer gives it ("" while a character is incomplete)."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [(stream.step(tokenizer._tokenizer, i) or "", [i]) for i in ids]


def group(deltas: Sequence[tuple[str, list[int]]], cuts: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Merge consecutive token deltas into bigger ones (several tokens per engine step),
    cutting before the given positions."""
    bounds = sorted({c for c in cuts if 0 < c < len(deltas)} | {0, len(deltas)})
    return [
        ("".join(t for t, _ in deltas[a:b]), [i for _, ids in deltas[a:b] for i in ids])
        for a, b in itertools.pairwise(bounds)
    ]


def chat_request(tools: list[dict] | None = TOOLS, thinking: bool | None = None, **fields: Any):
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    kwargs = {} if thinking is None else {"chat_template_kwargs": {"enable_thinking": thinking}}
    return ChatCompletionRequest(
        model="laguna", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools, **kwargs, **fields
    )


def prompt_ids(tokenizer, request) -> list[int]:
    """The rendered prompt's ids, as the server's renderer makes them."""
    text = tokenizer.apply_chat_template(
        request.messages,
        tools=[t.model_dump() for t in request.tools or []] or None,
        add_generation_prompt=True,
        tokenize=False,
        **(request.chat_template_kwargs or {}),
    )
    return tokenizer.encode(text, add_special_tokens=False)


def composed_parser_cls(tokenizer, tools: bool = True, reasoning: bool = True):
    """What ``vllm serve --reasoning-parser laguna --tool-call-parser laguna
    --enable-auto-tool-choice`` builds."""
    from vllm.parser import ParserManager

    import vllm_laguna

    vllm_laguna.register()
    return ParserManager.get_parser(
        tool_parser_name="laguna" if tools else None,
        reasoning_parser_name="laguna" if reasoning else None,
        enable_auto_tools=tools,
        tokenizer=tokenizer,
    )


@dataclass
class Parsed:
    """What a client ends up with: reasoning, content, [(name, arguments JSON)]."""

    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)
    ids: list[str | None] = field(default_factory=list)


def _new_parser(parser_cls, tokenizer, request):
    parser = parser_cls(tokenizer, request.tools, chat_template_kwargs=request.chat_template_kwargs or {})
    parser.adjust_request(request)
    return parser


def parse_complete(parser_cls, tokenizer, request, output: str) -> Parsed:
    parser = _new_parser(parser_cls, tokenizer, request)
    reasoning, content, calls = parser.parse(output, request, enable_auto_tools=True)
    if content is not None and calls and not content.strip():  # what the server returns
        content = None
    return Parsed(
        reasoning or "", content or "", [(c.name, c.arguments) for c in calls or []], [c.id for c in calls or []]
    )


def parse_streamed(
    parser_cls, tokenizer, request, deltas: Sequence[tuple[str, list[int]]], prompt: list[int], end_of_turn: bool = True
) -> Parsed:
    """Feed ``deltas`` to ``parse_delta`` as the server does; with ``end_of_turn`` the last
    step carries ``</assistant>``'s id and no text, as when the model stops on it."""
    parser = _new_parser(parser_cls, tokenizer, request)
    steps = list(deltas)
    if end_of_turn:
        steps.append(("", [tokenizer.get_vocab()[END_ASSISTANT]]))
    parsed, calls = Parsed(), {}
    for n, (text, ids) in enumerate(steps):
        delta = parser.parse_delta(text, list(ids), request, prompt, finished=n == len(steps) - 1)
        if delta is None:
            continue
        parsed.reasoning += delta.reasoning or ""
        parsed.content += delta.content or ""
        for call in delta.tool_calls:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": "", "ids": 0})
            if call.id is not None:
                entry["id"], entry["ids"] = call.id, entry["ids"] + 1
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    for index in sorted(calls):
        entry = calls[index]
        assert entry["ids"] == 1, f"call {index} got {entry['ids']} ids"
        parsed.calls.append((entry["name"], entry["arguments"]))
        parsed.ids.append(entry["id"])
    return parsed


@functools.lru_cache(maxsize=1)
def marker_free_tokenizer():
    """A tokenizer without any of Laguna's marker tokens (a model the parsers do not fit)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from vllm.tokenizers.hf import get_cached_tokenizer

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz <>/_")}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return get_cached_tokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"))
