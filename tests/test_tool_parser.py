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
    marker_free_tokenizer,
    parse_complete,
    parse_streamed,
    prompt_ids,
    tiny_tokenizer,
    token_deltas,
)

from vllm_laguna.laguna_format import END_ASSISTANT, END_THINK, END_TOOL_CALL, THINK, TOOL_CALL
from vllm_laguna.tool_parsers.arg_types import ArgumentSchemas, typed_value
from vllm_laguna.tool_parsers.call_scanner import _MAX_NAME


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


@pytest.mark.parametrize("reasoning_parser", [True, False])
def test_model_opened_think_with_thinking_off_is_content(tok, reasoning_parser):
    """The prompt closed the reasoning: vLLM streams everything to the tool parser, and the
    complete response agrees: the model's own ``<think>`` block is content, as written."""
    output = "\n<think>\nhmm\n</think>\n" + WEATHER
    parser_cls = composed_parser_cls(tok, reasoning=reasoning_parser)
    request = chat_request(thinking=False)
    expected = ("", "\n<think>\nhmm\n</think>\n", as_expected(CASES["single"][2]))
    streamed = parse_streamed(parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request))
    complete = parse_complete(parser_cls, tok, request, output)
    assert (streamed.reasoning, streamed.content, streamed.calls) == expected
    assert (complete.reasoning, complete.content, complete.calls) == expected


def test_long_names_and_keys_up_to_the_limit(tok):
    """Names and keys wait for their end up to ``_MAX_NAME`` characters; a longer name makes
    the block content, a longer key makes that argument content; streamed as complete."""
    name, key = "n" * _MAX_NAME, "k" * _MAX_NAME
    long_ok = call(name + "  ", ("  " + key + " ", "1"), ("a_rather_long_argument_name", "x"))  # blanks stripped
    too_long_name = call(name + "n", ("q", "1"))
    too_long_key = call("lookup", (key + "k", "1"), ("q", "2"))
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=False)
    cases = {
        long_ok: ("", [(name, json.dumps({key: 1, "a_rather_long_argument_name": "x"}))]),
        too_long_name: (too_long_name, []),
        too_long_key: (f"<arg_key>{key}k</arg_key>\n<arg_value>1</arg_value>\n", [("lookup", '{"q": 2}')]),
    }
    for output, (content, calls) in cases.items():
        complete = parse_complete(parser_cls, tok, request, output)
        assert (complete.content, complete.calls) == (content, calls)
        streamed = parse_streamed(parser_cls, tok, request, token_deltas(tok, output), prompt_ids(tok, request))
        assert (streamed.content, streamed.calls) == (content, calls)


def test_responses_api_tools_type_the_arguments(tok):
    """The Responses API's function tools are flat (no ``function`` level); their schemas
    type the arguments as chat-completion tools do."""
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest

    tools = [{"type": "function", **TOOLS[0]["function"]}]
    request = ResponsesRequest(model="laguna", input="Weather in Paris?", tools=tools)
    output = call("get_weather", ("city", "3"), ("days", "3"))
    info = tool_parser(tok, tools=None).extract_tool_calls(output, request)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in info.tool_calls] == [
        ("get_weather", {"city": "3", "days": 3})
    ]
    untyped = tool_parser(tok, tools=None).extract_tool_calls(output, chat_request(tools=None))
    assert json.loads(untyped.tool_calls[0].function.arguments) == {"city": 3, "days": 3}


def test_tokenizer_without_the_markers_is_refused_at_start():
    from vllm.parser import ParserManager

    import vllm_laguna

    vllm_laguna.register()
    plain = marker_free_tokenizer()
    with pytest.raises(ValueError, match=r"single tokens for \['<tool_call>', '</tool_call>'\]"):
        tool_parser(plain)
    with pytest.raises(TypeError, match=r"--tool-call-parser laguna cannot be used with the tokenizer.*<tool_call>"):
        ParserManager.get_parser(tool_parser_name="laguna", enable_auto_tools=True, tokenizer=plain)


def test_internal_error_is_logged_once_and_the_text_comes_back_as_content(tok, monkeypatch, parser_errors):
    """A bug in the scanner must not cost the response: complete, the output is content;
    streaming, the failing delta and every later one pass through as content. Each parser
    instance logs the error once, with its traceback (outside this test: a failure)."""
    from vllm_laguna.tool_parsers import call_scanner

    def broken(self, text, *, hold_partial=True):
        raise RuntimeError("planted")

    monkeypatch.setattr(call_scanner.ToolCallScanner, "feed", broken)
    request = chat_request()
    with parser_errors.expect() as records:
        info = tool_parser(tok).extract_tool_calls(WEATHER, request)
        assert (info.tools_called, info.content) == (False, WEATHER)
        parser, content = tool_parser(tok), ""
        for text, ids in token_deltas(tok, "Sure. " + WEATHER):
            delta = parser.extract_tool_calls_streaming("", "", text, [], [], ids, request)
            assert delta is None or not delta.tool_calls
            content += delta.content if delta is not None else ""
        assert content == "Sure. " + WEATHER
    assert len(records) == 2  # one per parser instance, not one per delta
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in records)
    assert "extract_tool_calls_streaming" in records[1].getMessage()


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
#: names and keys around the scanner's length limit, longer than any other generated text
_LONG = st.sampled_from([13, 40, _MAX_NAME, _MAX_NAME + 1, 300]).map(lambda n: "x" * n)
_ARG = st.builds(
    lambda k, v, sep: f"<arg_key>{k}</arg_key>{sep}<arg_value>{v}</arg_value>{sep}",
    st.one_of(st.sampled_from(["city", "days", "content", "options", "q", "when"]), _LONG),
    _VALUE,
    st.sampled_from(["\n", "", " "]),
)
_CALL = st.builds(
    lambda name, sep, args, junk: f"<tool_call>{name}{sep}{junk}{''.join(args)}</tool_call>",
    st.one_of(st.sampled_from(["get_weather", "write_file", "lookup", "get weather", ""]), _LONG),
    st.sampled_from(["\n", "", " \n"]),
    st.lists(_ARG, max_size=3),
    st.sampled_from(["", "", "oops ", "<arg_key>k</arg_key>\n"]),
)
_OUTPUT = st.lists(st.one_of(_SOUP, _CALL, st.sampled_from(["\n", END_TOOL_CALL, f"{THINK}ab{END_THINK}"])), max_size=6)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
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


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_ANY, thinking=st.booleans(), step=st.integers(1, 7), cuts=st.lists(st.integers(0, 60), max_size=6))
def test_arbitrary_text_never_raises_nor_loses_text(tok, text, thinking, step, cuts):
    """Any text, complete and streamed (through vLLM in token deltas, and as bare text in
    arbitrary pieces): without a call the text comes back whole; streaming ends with the
    complete response's calls, plus at most the one a cut-off output left open; a stream
    without calls gives the complete reasoning and content. (A parser error would not
    raise here: the fail-safe would log it, which fails the test.)"""
    parser_cls = composed_parser_cls(tok)
    request = chat_request(thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, text)
    for name, arguments in complete.calls:
        assert name in text and isinstance(json.loads(arguments), dict)
    streamed = parse_streamed(parser_cls, tok, request, group(token_deltas(tok, text), cuts), prompt_ids(tok, request))
    _assert_streamed_agrees(streamed, complete)

    info = tool_parser(tok).extract_tool_calls(text, request)
    if not info.tools_called:
        assert info.content == text  # no call: the text comes back whole
    parser, bare = tool_parser(tok), []
    pieces = [(text[i : i + step], []) for i in range(0, len(text), step)] + [("", [tok.get_vocab()[END_ASSISTANT]])]
    for piece, ids in pieces:  # the last, empty piece ends the turn
        bare.append(parser.extract_tool_calls_streaming("", "", piece, [], [], ids, request))
    calls: dict[int, list[str]] = {}
    for delta in filter(None, bare):
        for tc in delta.tool_calls:
            entry = calls.setdefault(tc.index, ["", ""])
            entry[0] += tc.function.name or ""
            entry[1] += tc.function.arguments or ""
    content = "".join(d.content or "" for d in bare if d is not None)
    from laguna_parsing import Parsed

    complete_tools = Parsed(content=info.content or "", calls=[(c.function.name, c.function.arguments) for c in info.tool_calls])
    if complete_tools.calls and not complete_tools.content.strip():
        complete_tools.content = ""
    _assert_streamed_agrees(Parsed(content=content, calls=[tuple(calls[i]) for i in sorted(calls)]), complete_tools)


def _assert_streamed_agrees(streamed, complete) -> None:
    done = len(complete.calls)
    assert streamed.calls[:done] == complete.calls and len(streamed.calls) - done in (0, 1)
    if not streamed.calls:
        assert (streamed.reasoning, streamed.content) == (complete.reasoning, complete.content)
