"""End to end: ``vllm serve --reasoning-parser laguna --tool-call-parser laguna
--enable-auto-tool-choice`` as a real process (on a Unix socket, see ``serving``), driven by
the official ``openai`` client, on a scripted tiny checkpoint (greedy decoding recites a fixed
script, see ``vllm_laguna.tiny.scripted``); and offline ``LLM.chat()`` with tools.

The server's script, after the chat template's last token:

- thinking on (``<think>``): reasoning that a ``<tool_call>`` ends without ``</think>`` (what
  vLLM's in-tree ``poolside_v1`` gets wrong), then the call;
- thinking off (``</think>``): content, then the same call.

The call's string value holds a newline, markup, ``<`` and non-ASCII text, streamed in
several tokens; ``<arg_key>``/``<arg_value>`` are split across tokens; ``days`` is an integer
and ``options`` a Python-literal object. The tokenizer marks ``<think>``/``<tool_call>``
special, so the parsers must keep them in the text themselves (``adjust_request``).
One server serves every check of this module, the 32-stream load test included.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from harness import start_engine
from laguna_parsing import TOOLS, composed_parser_cls, parse_complete
from serving import vllm_serve

from vllm_laguna.tiny.scripted import build_scripted

pytestmark = pytest.mark.slow

CALL = [
    "<tool_call>",
    "get_weather",
    "\n<arg_key>",
    "city",
    "</arg_key>\n<arg_value>",
    "Paris, ",
    "Île-de-France",
    "\n<b>1</b> < 2 🙂",
    "</arg_value>\n<arg_key>days",
    "</arg_key>\n<arg",
    "_value>7",
    "</arg_value>\n<arg_key>options</arg_key>\n<arg_value>{'unit': ",
    "'C'}",
    "</arg_value>\n",
    "</tool_call>",
    "</assistant>",
]
REASONING = ["<think>", "\nThe user", " asks about", " Paris weather.", " Calling the tool.\n", "<tool_call>"]
CONTENT = ["</think>", "\nLet me", " check the", " forecast.\n", "<tool_call>"]

EXPECTED_CALL = ("get_weather", {"city": "Paris, Île-de-France\n<b>1</b> < 2 🙂", "days": 7, "options": {"unit": "C"}})
EXPECTED = {  # thinking -> (reasoning, content)
    True: ("\nThe user asks about Paris weather. Calling the tool.\n", None),
    False: (None, "\nLet me check the forecast.\n"),
}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
MODEL = "laguna-scripted"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("laguna-server")
    checkpoint = build_scripted(root / "ckpt", [REASONING, CONTENT, CALL], special_markers=True)
    flags = [
        "--served-model-name", MODEL,
        "--reasoning-parser", "laguna", "--tool-call-parser", "laguna", "--enable-auto-tool-choice",
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32", "--enforce-eager",
    ]  # fmt: skip
    with vllm_serve(checkpoint, root / "server.log", *flags) as client:
        yield client


def create(client, thinking: bool, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=64,
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **extra,
    )  # fmt: skip


def collect_stream(stream) -> dict:
    """What a streaming client assembles, plus how it arrived."""
    got = {"reasoning": "", "content": "", "calls": {}, "finish_reason": None, "argument_deltas": 0}
    for chunk in stream:
        for choice in chunk.choices:
            delta = choice.delta
            got["reasoning"] += getattr(delta, "reasoning", None) or ""
            got["content"] += delta.content or ""
            for call in delta.tool_calls or []:
                entry = got["calls"].setdefault(call.index, {"ids": [], "name": "", "arguments": ""})
                if call.id:
                    entry["ids"].append(call.id)
                if call.function and call.function.name:
                    assert not entry["arguments"], "arguments before the name"
                    entry["name"] += call.function.name
                if call.function and call.function.arguments:
                    entry["arguments"] += call.function.arguments
                    got["argument_deltas"] += 1
            got["finish_reason"] = choice.finish_reason or got["finish_reason"]
    return got


def summary(got: dict) -> tuple:
    calls = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(got["calls"].items())]
    return got["reasoning"] or None, got["content"] or None, calls, got["finish_reason"]


def test_offline_llm_chat_with_tools(tmp_path):
    """``LLM.chat`` renders the tools through the template (one BOS) and greedy decoding
    follows the script; our parsers read the raw text: reasoning ended by ``</think>``,
    content, a typed call."""
    from harness import shutdown
    from vllm import SamplingParams

    script = [
        ["<think>", "Checking", " the forecast.", "</think>", "\nOn it.\n", "<tool_call>", "get_weather",
         "\n<arg_key>city</arg_key>\n<arg_value>", "Rome", "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>",
         " 2 ", "</arg_value>\n", "</tool_call>", "</assistant>"],
    ]  # fmt: skip
    checkpoint = build_scripted(tmp_path / "ckpt", script, special_markers=False)
    llm = start_engine(checkpoint, max_model_len=2048)
    try:
        (out,) = llm.chat(
            MESSAGES, SamplingParams(temperature=0, max_tokens=64), tools=TOOLS,
            chat_template_kwargs={"enable_thinking": True}, use_tqdm=False,
        )  # fmt: skip
    finally:
        shutdown(llm)
    prompt = list(out.prompt_token_ids)
    assert prompt[0] == 2 and prompt.count(2) == 1  # the template's BOS, no second one
    tokenizer = llm_tokenizer(checkpoint)
    assert tokenizer.decode(prompt[-3:]) == "<assistant>\n<think>"
    assert "get_weather" in tokenizer.decode(prompt)  # the tools section
    text = out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
    parser_cls = composed_parser_cls(tokenizer)
    from laguna_parsing import chat_request

    parsed = parse_complete(parser_cls, tokenizer, chat_request(thinking=True), text)
    assert (parsed.reasoning, parsed.content) == ("Checking the forecast.", "\nOn it.\n")
    assert [(n, json.loads(a)) for n, a in parsed.calls] == [("get_weather", {"city": "Rome", "days": 2})]


def llm_tokenizer(checkpoint: Path):
    from transformers import AutoTokenizer
    from vllm.tokenizers.hf import get_cached_tokenizer

    return get_cached_tokenizer(AutoTokenizer.from_pretrained(str(checkpoint)))


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_completion(client, thinking):
    response = create(client, thinking)
    choice = response.choices[0]
    reasoning, content = EXPECTED[thinking]
    assert getattr(choice.message, "reasoning", None) == reasoning
    assert choice.message.content == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls] == [EXPECTED_CALL]
    assert choice.message.tool_calls[0].id and choice.message.tool_calls[0].type == "function"
    assert choice.finish_reason == "tool_calls"
    details = response.usage.completion_tokens_details
    assert details.reasoning_tokens == (len(REASONING) - 2 if thinking else 0)


@pytest.mark.parametrize("thinking", [True, False])
def test_streamed_chat_completion(client, thinking):
    got = collect_stream(create(client, thinking, stream=True))
    assert summary(got) == (*EXPECTED[thinking], [EXPECTED_CALL], "tool_calls")
    (call,) = got["calls"].values()
    assert len(call["ids"]) == 1  # one id per call, on its first delta
    # the arguments stream in pieces, not once complete. Not one piece a token: under load,
    # vLLM's output collector merges the deltas a slow client has not read yet into one (the
    # parser's token-by-token pieces: test_tool_parser's test_name_first_then_string_arguments_as_they_arrive)
    assert got["argument_deltas"] >= 2


def test_without_tools_the_call_is_plain_content(client):
    """No tools: nothing parses calls, but the reasoning still ends where the call begins and
    the (special) markers stay in the text."""
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=64,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )  # fmt: skip
    choice = response.choices[0]
    assert choice.message.reasoning == EXPECTED[True][0]
    assert choice.message.content == "".join(CALL[:-1])
    assert not choice.message.tool_calls and choice.finish_reason == "stop"


@pytest.mark.parametrize("thinking", [True, False])
def test_structured_output_applies_after_the_reasoning(client, thinking):
    """The engine core's gate (its own parser instance, on token ids): thinking off, the
    prompt already closed the reasoning and the grammar binds from the first token; thinking
    on, the reasoning runs free until the ``<tool_call>`` that ends it. (That end token is
    not itself under the grammar: vLLM constrains from the token after a legacy parser's
    end marker.)"""
    body = {"chat_template_kwargs": {"enable_thinking": thinking}, "structured_outputs": {"choice": ["yes", "no"]}}
    response = client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=32, extra_body=body
    )
    message = response.choices[0].message
    reasoning, _ = EXPECTED[thinking]
    assert message.reasoning == reasoning
    assert (message.content.removeprefix("<tool_call>") if thinking else message.content) in ("yes", "no")


def test_32_concurrent_streams_match_the_sequential_ones(client):
    reference = {thinking: summary(collect_stream(create(client, thinking, stream=True))) for thinking in (True, False)}
    modes = [i % 2 == 0 for i in range(32)]
    with ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda thinking: summary(collect_stream(create(client, thinking, stream=True))), modes))
    for thinking, result in zip(modes, results, strict=True):
        assert result == reference[thinking]
    assert reference[True] == (*EXPECTED[True], [EXPECTED_CALL], "tool_calls")
