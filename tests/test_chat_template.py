"""The tiny checkpoints' chat template renders XS.2's layout (FACTS.md): the system block
with the tools section, user turns, assistant turns with and without kept reasoning and
with tool calls, tool responses, and the generation prompt per ``enable_thinking``."""

from __future__ import annotations

import pytest
from laguna_parsing import TOOLS, tiny_tokenizer

from vllm_laguna.laguna_format import EOS

WEATHER_TOOL_JSON = (
    '{"name": "get_weather", "description": "Weather forecast for a city.", "parameters": {"type": "object", '
    '"properties": {"city": {"type": "string"}, "days": {"type": "integer"}, "when": {"type": ["string", "null"]}, '
    '"options": {"type": "object"}, "hours": {"type": "array", "items": {"type": "integer"}}, "metric": {"type": '
    '"boolean"}}, "required": ["city"]}}'
)
TOOLS_SECTION = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n"
    "Here are the available tools, as JSON schemas:\n<tools>\n" + WEATHER_TOOL_JSON + "\n</tools>\n\n"
    "To call a function, write a tool call in this format:\n<tool_call>function_name\n"
    "<arg_key>argument_name</arg_key>\n<arg_value>argument_value</arg_value>\n</tool_call>"
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def render(tok, messages, tools=None, **kwargs):
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "suffix"),
    [({}, "</think>"), ({"enable_thinking": False}, "</think>"), ({"enable_thinking": True}, "<think>")],
)
def test_first_turn_and_generation_prompt(tok, kwargs, suffix):
    rendered = render(tok, [{"role": "user", "content": "Hi there"}], **kwargs)
    assert rendered == f"{EOS}<system>\n\n\n</system>\n<user>\nHi there\n</user>\n<assistant>\n{suffix}"


def test_system_and_tools_section(tok):
    rendered = render(
        tok, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"}], tools=TOOLS[:1]
    )
    assert rendered == (
        f"{EOS}<system>\n\nBe brief.\n\n{TOOLS_SECTION}\n</system>\n<user>\nWeather?\n</user>\n<assistant>\n</think>"
    )
    no_system = render(tok, [{"role": "user", "content": "Weather?"}], tools=TOOLS[:1])
    assert no_system.startswith(f"{EOS}<system>\n\n{TOOLS_SECTION}\n</system>\n<user>\n")


def test_history_with_reasoning_tool_calls_and_responses(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning": "Use the tool.",
            "tool_calls": [
                {
                    "id": "a",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris\n<b>", "days": 3}},
                },
                {
                    "id": "b",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"options": {"unit": "C"}}},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "a", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "b", "content": [{"type": "text", "text": "21 C"}]},
        {"role": "assistant", "content": "Sunny, 21 C."},
        {"role": "user", "content": "Thanks"},
    ]
    assert render(tok, messages, enable_thinking=True) == (
        f"{EOS}<system>\n\n\n</system>\n"
        "<user>\nWeather in Paris?\n</user>\n"
        "<assistant>\n<think>\nUse the tool.\n</think>\nChecking.\n"
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris\n<b></arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>\n"
        '<tool_call>get_weather\n<arg_key>options</arg_key>\n<arg_value>{"unit": "C"}</arg_value>\n</tool_call>\n'
        "</assistant>\n"
        "<tool_response>\nSunny\n</tool_response>\n"
        "<tool_response>\n21 C\n</tool_response>\n"
        "<assistant>\n</think>\nSunny, 21 C.\n</assistant>\n"
        "<user>\nThanks\n</user>\n"
        "<assistant>\n<think>"
    )


def test_tool_call_without_content_and_reasoning_content_key(tok):
    messages = [
        {"role": "user", "content": "x"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "r",
            "tool_calls": [{"type": "function", "function": {"name": "get_time", "arguments": {}}}],
        },
    ]
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert rendered.endswith("<assistant>\n<think>\nr\n</think>\n<tool_call>get_time\n</tool_call>\n</assistant>\n")


def test_template_emits_the_only_bos(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 2 and ids.count(2) == 1
    vocab = tok.get_vocab()
    (newline,) = tok.encode("\n", add_special_tokens=False)
    assert ids[-3:] == [vocab["<assistant>"], newline, vocab["</think>"]]
