"""The ``laguna`` tool-call parser: Laguna's XML calls, values typed by the request's tool
schema, complete and streamed (through vLLM's own ``DelegatingParser``, as the server runs
it), malformed output kept as content."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from laguna_parsing import (
    TOOLS,
    chat_request,
    composed_parser_cls,
    group,
    parse_complete,
    parse_streamed,
    prompt_ids,
    tiny_tokenizer,
    token_deltas,
)

from vllm_laguna.laguna_format import END_THINK, END_TOOL_CALL, THINK, TOOL_CALL
from vllm_laguna.tool_parsers.arg_types import ArgumentSchemas, typed_value


def call(name: str, *args: tuple[str, str], sep: str = "\n") -> str:
    body = "".join(f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}" for k, v in args)
    return f"<tool_call>{name}{sep}{body}</tool_call>"


CODE = 'def f(a, b):\n    return a < b  # <b>x</b> & "q"\n\t東京 🙂 naïve\n'
WEATHER = call("get_weather", ("city", "Paris"), ("days", "3"))

# output -> (content, [(name, arguments)]); expectations written by hand from FACTS.md
CASES = {
    "single": (WEATHER, None, [("get_weather", {"city": "Paris", "days": 3})]),
    "content-before": ("Let me check.\n" + WEATHER, "Let me check.\n", [("get_weather", {"city": "Paris", "days": 3})]),
    "blank-content-is-none": ("\n\n" + WEATHER + "\n", None, [("get_weather", {"city": "Paris", "days": 3})]),
    "two-calls": (
        WEATHER + "\n" + call("write_file", ("path", "a.py"), ("content", "x")),
        None,
        [("get_weather", {"city": "Paris", "days": 3}), ("write_file", {"path": "a.py", "content": "x"})],
    ),
    "raw-string": (
        call("write_file", ("path", "a.py"), ("content", CODE)),
        None,
        [("write_file", {"path": "a.py", "content": CODE})],
    ),
    "string-keeps-blanks": (
        call("get_weather", ("city", " New York\n")),
        None,
        [("get_weather", {"city": " New York\n"})],
    ),
    "typed-json": (
        call(
            "get_weather",
            ("city", "Rome"),
            ("days", " 7 "),
            ("options", '{"unit": "C", "detail": [1, 2.5]}'),
            ("hours", "[9, 12]"),
            ("metric", "true"),
            ("when", "tomorrow"),
        ),
        None,
        [
            (
                "get_weather",
                {
                    "city": "Rome",
                    "days": 7,
                    "options": {"unit": "C", "detail": [1, 2.5]},
                    "hours": [9, 12],
                    "metric": True,
                    "when": "tomorrow",
                },
            )
        ],
    ),
    "python-literals": (
        call("get_weather", ("city", "Oslo"), ("options", "{'unit': 'C'}"), ("metric", "True"), ("hours", "(1, 2)")),
        None,
        [("get_weather", {"city": "Oslo", "options": {"unit": "C"}, "metric": True, "hours": [1, 2]})],
    ),
    "raw-fallback": (
        call("get_weather", ("city", "Lima"), ("days", "three"), ("hours", "NaN")),
        None,
        [("get_weather", {"city": "Lima", "days": "three", "hours": "NaN"})],
    ),
    "untyped-tool": (
        call("lookup", ("q", "42"), ("text", "hello world")),
        None,
        [("lookup", {"q": 42, "text": "hello world"})],
    ),
    "enum-string": (call("write_file", ("mode", "a")), None, [("write_file", {"mode": "a"})]),
    "no-arguments": ("<tool_call>get_time\n</tool_call>", None, [("get_time", {})]),
    "no-newlines": (call("get_weather", ("city", "Paris"), sep=""), None, [("get_weather", {"city": "Paris"})]),
    "text-after-calls": (WEATHER + "\nDone.", "\nDone.", [("get_weather", {"city": "Paris", "days": 3})]),
    # malformed: never raises, what is not a call stays content
    "invalid-name": (call("get weather now", ("a", "1")), call("get weather now", ("a", "1")), []),
    "json-instead-of-xml": (
        '<tool_call>{"name": "get_weather"}</tool_call>',
        '<tool_call>{"name": "get_weather"}</tool_call>',
        [],
    ),
    "empty-block": ("a<tool_call></tool_call>b", "a<tool_call></tool_call>b", []),
    "stray-closing-tag": ("Hello </tool_call> world", "Hello </tool_call> world", []),
    "cut-off": ("Sure " + WEATHER[:-30], "Sure " + WEATHER[:-30], []),
    "cut-off-after-a-call": (
        WEATHER + "\n<tool_call>get_weather\n<arg_key>ci",
        "\n<tool_call>get_weather\n<arg_key>ci",
        [("get_weather", {"city": "Paris", "days": 3})],
    ),
    "key-without-value": (
        "<tool_call>get_weather\n<arg_key>city</arg_key>\n</tool_call>",
        "<arg_key>city</arg_key>\n",
        [("get_weather", {})],
    ),
    "repeated-key": (
        call("get_weather", ("city", "Paris"), ("city", "Rome")),
        "<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n",
        [("get_weather", {"city": "Paris"})],
    ),
    "stray-words-in-body": (
        "<tool_call>get_weather\nplease\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>",
        "please\n",
        [("get_weather", {"city": "Paris"})],
    ),
    "next-call-without-closing": (
        "<tool_call>a\n<arg_key>x</arg_key><arg_value>1</arg_value>" + call("b"),
        None,
        [("a", {"x": 1}), ("b", {})],
    ),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def as_expected(calls):
    return [(name, json.dumps(args, ensure_ascii=False)) for name, args in calls]


def tool_parser(tok, tools=TOOLS):
    from vllm.tool_parsers import ToolParserManager

    import vllm_laguna

    vllm_laguna.register()
    return ToolParserManager.get_tool_parser("laguna")(tok, chat_request(tools=tools).tools)


def test_registered_under_laguna(tok):
    from vllm_laguna.tool_parsers.laguna_tool_parser import LagunaToolParser

    assert type(tool_parser(tok)) is LagunaToolParser


@pytest.mark.parametrize("name", list(CASES))
def test_complete(tok, name):
    output, content, calls = CASES[name]
    info = tool_parser(tok).extract_tool_calls(output, chat_request())
    assert info.content == content
    assert [(c.function.name, c.function.arguments) for c in info.tool_calls] == as_expected(calls)
    assert info.tools_called is bool(calls)
    assert len({c.id for c in info.tool_calls}) == len(calls)


@pytest.mark.parametrize("thinking", [False, True])
@pytest.mark.parametrize("name", [n for n in CASES if "cut-off" not in n])  # see test_cut_off_call_streams_valid_json
def test_streamed_token_by_token_through_vllm(tok, name, thinking):
    """What a streaming client assembles equals the complete response; in thinking mode the
    output starts with reasoning that a <tool_call> ends. (A cut-off call cannot be taken
    back once streamed.)"""
    output, content, calls = CASES[name]
    if thinking:
        output = "Think <b>first</b>.\n" + output if output.startswith(TOOL_CALL) else "Think.\n</think>" + output
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, output)
    assert (complete.content, complete.calls) == (content or "", as_expected(calls))
    streamed = parse_streamed(parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request))
    assert (streamed.reasoning, streamed.content, streamed.calls) == (
        complete.reasoning,
        complete.content,
        complete.calls,
    )
    assert len(set(streamed.ids)) == len(calls)


def test_name_first_then_string_arguments_as_they_arrive(tok):
    value = "first line\nsecond <line> with more words to stream"
    output = "<tool_call>write_file\n<arg_key>content</arg_key>\n<arg_value>" + value + "</arg_value>\n</tool_call>"
    parser = tool_parser(tok)
    request = chat_request()
    seen, named_at, fragments = "", None, []
    for text, ids in token_deltas(tok, output):
        seen += text
        delta = parser.extract_tool_calls_streaming("", "", text, [], [], ids, request)
        for tc in delta.tool_calls if delta else []:
            if tc.function.name:
                assert named_at is None
                named_at = seen
            if tc.function.arguments:
                fragments.append((seen, tc.function.arguments))
    assert named_at == "<tool_call>write_file\n"  # the name goes out with the newline that ends it
    streaming_value = [f for s, f in fragments if "</arg_value>" not in s]
    assert len(streaming_value) >= 5  # the value streams in pieces, not once complete
    assert json.loads("".join(f for _, f in fragments)) == {"content": value}


def test_cut_off_call_streams_valid_json(tok):
    """``max_tokens`` cuts a string value: vLLM's end-of-stream step closes the JSON from
    what the parser reports as read and sent."""
    output = "<tool_call>write_file\n<arg_key>content</arg_key>\n<arg_value>abc def"
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=False)
    streamed = parse_streamed(
        parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request), end_of_turn=False
    )
    assert [(n, json.loads(a)) for n, a in streamed.calls] == [("write_file", {"content": "abc def"})]


def test_required_tool_choice_parses_the_xml(tok):
    parser_cls = composed_parser_cls(tok)
    request = chat_request(tool_choice="required", thinking=False)
    assert parse_complete(parser_cls, tok, request, WEATHER).calls == as_expected(CASES["single"][2])


@pytest.mark.parametrize(
    ("tools", "tool_choice", "keeps"), [(TOOLS, "auto", True), (TOOLS, "none", False), (None, None, False)]
)
@pytest.mark.parametrize("special", [False, True])
def test_adjust_request_keeps_tool_call_tokens(special, tools, tool_choice, keeps):
    tok = tiny_tokenizer(special_markers=special)
    request = chat_request(tools=tools, **({"tool_choice": tool_choice} if tool_choice else {}))
    untouched = request.skip_special_tokens  # vLLM 0.32: True; 0.33: None (= True, decided later)
    tool_parser(tok).adjust_request(request)
    assert request.skip_special_tokens is (False if keeps else untouched)
    assert request.structured_outputs is None  # no JSON grammar forced on an XML model


def test_model_opened_think_with_thinking_off_streams_as_reasoning(tok):
    """The prompt closed the reasoning, so vLLM sends everything to the tool parser."""
    output = "\n<think>\nhmm\n</think>\n" + WEATHER
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=False)
    streamed = parse_streamed(parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request))
    assert (streamed.reasoning, streamed.content, streamed.calls) == ("\nhmm\n", "", as_expected(CASES["single"][2]))
    complete = parse_complete(parser_cls, tok, request, output)
    assert (complete.reasoning, complete.content, complete.calls) == (
        streamed.reasoning,
        streamed.content,
        streamed.calls,
    )


def test_without_reasoning_parser_a_think_block_is_content(tok):
    """vLLM tells the tool parser when no reasoning parser is configured."""
    output = "<think>hmm</think>\n" + WEATHER
    parser_cls = composed_parser_cls(tok, reasoning=False)
    request = chat_request(thinking=False)
    streamed = parse_streamed(parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request))
    complete = parse_complete(parser_cls, tok, request, output)
    expected = ("", "<think>hmm</think>\n", as_expected(CASES["single"][2]))
    assert (streamed.reasoning, streamed.content, streamed.calls) == expected
    assert (complete.reasoning, complete.content, complete.calls) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        (" -2.5 ", -2.5),
        ('[1, {"a": null}]', [1, {"a": None}]),
        ("None", None),
        ("'x'", "x"),
        ("{'a': (1, 2)}", {"a": [1, 2]}),
        ("{1, 2}", "{1, 2}"),
        ("1e400", "1e400"),
        ("Infinity", "Infinity"),
        ("abc", "abc"),
        ("\n text \n", "\n text \n"),
    ],
)
def test_typed_value(text, value):
    assert typed_value(text) == value


def test_string_parameters_from_schema():
    schemas = ArgumentSchemas(chat_request().tools)
    assert [schemas.is_string("get_weather", k) for k in ("city", "days", "when", "options", "nope")] == [
        True,
        False,
        True,
        False,
        False,
    ]
    assert schemas.is_string("write_file", "mode") and not schemas.is_string("lookup", "q")
    anyof = ArgumentSchemas(
        chat_request(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "s": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                                "n": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
                            },
                        },
                    },
                }
            ]
        ).tools
    )
    assert anyof.is_string("f", "s") and not anyof.is_string("f", "n")


# -- properties --

_SOUP = st.text(alphabet=list("ab \n<>/é東🙂{}\"'"), max_size=10)
_VALUE = st.one_of(
    _SOUP, st.sampled_from(["3", " 7 ", "[1, 2]", '{"a": 1}', "True", "NaN", "null", "{'x': (1, 2)}", ""])
)
_ARG = st.builds(
    lambda k, v, sep: f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}",
    st.sampled_from(["city", "days", "content", "options", "q", "when"]),
    _VALUE,
    st.sampled_from(["\n", "", " "]),
)
_CALL = st.builds(
    lambda name, sep, args, junk: f"<tool_call>{name}{sep}{junk}{''.join(args)}</tool_call>",
    st.sampled_from(["get_weather", "write_file", "lookup", "get weather", ""]),
    st.sampled_from(["\n", "", " \n"]),
    st.lists(_ARG, max_size=3),
    st.sampled_from(["", "", "oops ", "<arg_key>k</arg_key>\n"]),
)
_OUTPUT = st.lists(st.one_of(_SOUP, _CALL, st.sampled_from(["\n", END_TOOL_CALL, f"{THINK}ab{END_THINK}"])), max_size=6)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=_OUTPUT,
    reasoning=_SOUP,
    closes=st.booleans(),
    thinking=st.booleans(),
    cuts=st.lists(st.integers(0, 80), max_size=10),
)
def test_any_split_streams_to_the_complete_result(tok, parts, reasoning, closes, thinking, cuts):
    """Outputs whose calls are all closed, cut into deltas of one or more tokens anywhere,
    stream (through vLLM's DelegatingParser) to exactly the complete response."""
    output = (reasoning + (END_THINK if closes else "") if thinking else "") + "".join(parts)
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, output)
    streamed = parse_streamed(
        parser_cls, tok, request, group(token_deltas(tok, output), cuts), prompt_ids(tok, request)
    )
    assert (streamed.reasoning, streamed.content, streamed.calls) == (
        complete.reasoning,
        complete.content,
        complete.calls,
    )
    for _, arguments in streamed.calls:
        assert isinstance(json.loads(arguments), dict)


_ANY = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.sampled_from(
            [
                THINK,
                END_THINK,
                TOOL_CALL,
                END_TOOL_CALL,
                "<arg_key>",
                "</arg_key>",
                "<arg_value>",
                "</arg_value>",
                "get_weather\n",
            ]
        ),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_ANY, thinking=st.booleans(), step=st.integers(1, 7), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_arbitrary_text_never_raises_nor_loses_text(tok, text, thinking, step, cuts):
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, text)
    parse_streamed(
        parser_cls, tok, request, group(token_deltas(tok, text), cuts), prompt_ids(tok, request), end_of_turn=False
    )
    # bare text in arbitrary pieces, no token ids
    parser = tool_parser(tok)
    for i in range(0, len(text), step):
        parser.extract_tool_calls_streaming("", "", text[i : i + step], [], [], [], request)
    info = tool_parser(tok).extract_tool_calls(text, request)
    if not info.tools_called:
        assert info.content == text  # no call: the text comes back whole
    for name, arguments in complete.calls:
        assert name in text and isinstance(json.loads(arguments), dict)
