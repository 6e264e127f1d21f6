"""The ``laguna`` reasoning parser: where the reasoning of a Laguna turn ends, on text (the
serving layer) and on token ids (the engine core's structured-output gate), complete and
streamed; with the tiny tokenizer, whose ``<think>``/``</think>``/``<tool_call>`` are single
tokens and whose ``<arg_key>``/``<arg_value>`` span several."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from laguna_parsing import (
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

from vllm_laguna.laguna_format import ARG_KEY, ARG_VALUE, ASSISTANT, END_THINK, THINK, TOOL_CALL

CALL = "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>"

# (thinking, model output, reasoning, content), expectations written from FACTS.md
CASES = {
    "explicit-end": (True, "I should check.\n</think>\nIt is sunny.", "I should check.\n", "\nIt is sunny."),
    "implicit-end-at-tool-call": (True, "Need the tool.\n" + CALL, "Need the tool.\n", CALL),
    "never-ends": (True, "Still thinking\nabout <b>it</b>", "Still thinking\nabout <b>it</b>", None),
    "own-think-at-start-dropped": (True, "<think>abc</think>def", "abc", "def"),
    "empty-reasoning": (True, "</think>Hi", None, "Hi"),
    "content-then-call-after-end": (True, "r</think>Sure." + CALL, "r", "Sure." + CALL),
    "after-a-call-all-content": (True, "r" + CALL + "</think>x", "r", CALL + "</think>x"),
    # the reasoning is the block the turn starts with; a later <think> block is content
    "think-after-the-end-is-content": (True, "a</think>\n<think>b</think>\nc", "a", "\n<think>b</think>\nc"),
    "off-content": (False, "\nIt is sunny.", None, "\nIt is sunny."),
    # thinking off: the prompt closed the reasoning; the model's own block is content
    "off-model-opens-think": (False, "\n<think>\nhmm\n</think>\nSunny.", None, "\n<think>\nhmm\n</think>\nSunny."),
    "off-model-opens-think-then-calls": (False, "<think>check" + CALL, None, "<think>check" + CALL),
    "off-think-after-text-is-content": (False, "Sure <think>x</think>", None, "Sure <think>x</think>"),
    "off-call-only": (False, "\n" + CALL, None, "\n" + CALL),
    "unicode": (True, "東京 🙂 é\n</think>naïve <café>", "東京 🙂 é\n", "naïve <café>"),
}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def parser_for(tok, thinking):
    from vllm.reasoning import ReasoningParserManager

    import vllm_laguna

    vllm_laguna.register()
    cls = ReasoningParserManager.get_reasoning_parser("laguna")
    return cls(tok, chat_template_kwargs={} if thinking is None else {"enable_thinking": thinking})


def stream_directly(parser, deltas):
    """``extract_reasoning_streaming`` for every delta; (reasoning, content) concatenated."""
    reasoning = content = ""
    previous_text, previous_ids = "", []
    for text, ids in deltas:
        delta = parser.extract_reasoning_streaming(
            previous_text, previous_text + text, text, previous_ids, previous_ids + ids, ids
        )
        previous_text, previous_ids = previous_text + text, previous_ids + ids
        if delta is not None:
            reasoning += delta.reasoning or ""
            content += delta.content or ""
    return reasoning or None, content or None


def test_tokenizer_has_laguna_token_layout(tok):
    vocab = tok.get_vocab()
    assert [vocab[m] for m in (THINK, END_THINK, ASSISTANT)] == [18, 19, 23]
    assert len(tok.encode(TOOL_CALL, add_special_tokens=False)) == 1
    assert len(tok.encode(ARG_KEY, add_special_tokens=False)) > 1
    assert len(tok.encode(ARG_VALUE, add_special_tokens=False)) > 1


def test_registered_under_laguna(tok):
    from vllm.reasoning import ReasoningParserManager

    from vllm_laguna.reasoning.laguna_reasoning_parser import LagunaReasoningParser

    parser = parser_for(tok, True)
    assert type(parser) is ReasoningParserManager.get_reasoning_parser("laguna") is LagunaReasoningParser
    assert (parser.reasoning_start_str, parser.reasoning_end_str) == (THINK, END_THINK)


@pytest.mark.parametrize("name", list(CASES))
def test_complete_and_token_streamed_agree_with_expectation(tok, name):
    thinking, output, reasoning, content = CASES[name]
    assert parser_for(tok, thinking).extract_reasoning(output, chat_request()) == (reasoning, content)
    assert stream_directly(parser_for(tok, thinking), token_deltas(tok, output)) == (reasoning, content)


@pytest.mark.parametrize("name", list(CASES))
def test_character_streamed_without_token_ids_agrees(tok, name):
    """Text arriving in arbitrary pieces without token boundaries (markers split)."""
    thinking, output, reasoning, content = CASES[name]
    parser = parser_for(tok, thinking)
    pieces = [(output[i : i + 3], []) for i in range(0, len(output), 3)]
    got_reasoning, got_content = stream_directly(parser, pieces)
    tail_reasoning, tail_content = parser._stream.finish()  # the end of the output
    assert ((got_reasoning or "") + tail_reasoning or None, (got_content or "") + tail_content or None) == (
        reasoning,
        content,
    )


def test_thinking_mode_from_request_when_parser_has_no_kwargs(tok):
    parser = parser_for(tok, None)  # the tiny template's default: thinking off
    output = "abc</think>def"
    assert parser.extract_reasoning(output, chat_request()) == (None, output)
    assert parser.extract_reasoning(output, chat_request(thinking=True)) == ("abc", "def")
    assert parser.extract_reasoning(output, chat_request(reasoning_effort="high")) == ("abc", "def")


@pytest.fixture(scope="module")
def thinking_first(tok):
    """The tiny tokenizer with a chat template that thinks unless told otherwise."""
    from transformers import AutoTokenizer

    thinking_first = AutoTokenizer.from_pretrained(tok.name_or_path)
    thinking_first.chat_template = thinking_first.chat_template.replace(
        "enable_thinking if enable_thinking is defined else false",
        "enable_thinking if enable_thinking is defined else true",
    )
    assert thinking_first.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    ).endswith(THINK)
    return thinking_first


def test_thinking_default_read_from_the_chat_template(thinking_first):
    assert parser_for(thinking_first, None).extract_reasoning("abc</think>def", chat_request()) == ("abc", "def")
    assert parser_for(thinking_first, False).extract_reasoning("abc</think>def", chat_request()) == (
        None,
        "abc</think>def",
    )


def test_reasoning_effort_none_turns_a_thinking_default_off(thinking_first):
    """vLLM renders ``enable_thinking = reasoning_effort != "none"``; the parser reads the same."""
    parser = parser_for(thinking_first, None)
    assert parser.extract_reasoning("abc</think>def", chat_request(reasoning_effort="none")) == (None, "abc</think>def")
    assert parser.extract_reasoning("abc</think>def", chat_request(reasoning_effort="low")) == ("abc", "def")
    # an explicit enable_thinking wins over the effort, as in vLLM's rendering
    request = chat_request(thinking=True, reasoning_effort="none")
    assert parser.extract_reasoning("abc</think>def", request) == ("abc", "def")


def test_prompt_state_looks_back_only_to_the_current_assistant_turn(tok):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Sunny.", "reasoning": "I know this."},  # kept reasoning: </think>
        {"role": "user", "content": "And Rome?"},
    ]
    for thinking in (True, False):
        parser = parser_for(tok, thinking)
        request = chat_request(thinking=thinking)
        request.messages = history
        prompt = prompt_ids(tok, request)
        assert tok.get_vocab()[END_THINK] in prompt[:-1]  # an earlier turn's </think> ...
        assert tok.get_vocab()[TOOL_CALL] in prompt  # ... and the tools section's <tool_call>
        assert parser.is_reasoning_end(prompt) is (not thinking)  # ... say nothing about this turn


def test_prompt_state_without_markers_follows_the_thinking_mode(tok):
    plain = tok.encode("hello", add_special_tokens=False)
    turn = tok.encode("〈|EOS|〉<user>\nx\n</user>\n<assistant>\n", add_special_tokens=False)
    for ids in (plain, turn):
        assert parser_for(tok, True).is_reasoning_end(ids) is False
        assert parser_for(tok, False).is_reasoning_end(ids) is True


@pytest.mark.parametrize(
    ("name", "first_block"),
    [
        ("explicit-end", "I should check.\n"),
        ("implicit-end-at-tool-call", "Need the tool.\n"),
        ("never-ends", None),
        ("think-after-the-end-is-content", "a"),
    ],
)
def test_engine_gate_ends_where_the_text_does(tok, name, first_block):
    """The structured-output gate (token ids, a fresh instance per request, prompt + output
    as ``input_ids``) opens on the token where extraction ends the first reasoning block."""
    thinking, output, _, _ = CASES[name]
    request = chat_request(thinking=thinking)
    prompt = prompt_ids(tok, request)
    gate = parser_for(tok, thinking)
    assert gate.is_reasoning_end(prompt) is False
    out = tok.encode(output, add_special_tokens=False)
    opened = next(
        (i for i in range(len(out)) if gate.is_reasoning_end_streaming(prompt + out[: i + 1], out[i : i + 1])), None
    )
    if first_block is None:
        assert opened is None
        return
    assert tok.decode(out[:opened]) == first_block
    assert tok.decode(out[opened : opened + 1]) in (END_THINK, TOOL_CALL)


def test_extract_content_ids(tok):
    parser = parser_for(tok, True)
    vocab = tok.get_vocab()
    a, b = tok.encode("ab", add_special_tokens=False)[:1], tok.encode("cd", add_special_tokens=False)
    end, call = vocab[END_THINK], vocab[TOOL_CALL]
    assert parser.extract_content_ids(a + [end] + b) == b
    assert parser.extract_content_ids(a + [call] + b) == [call] + b
    assert parser.extract_content_ids(a + b) == []
    # the first end decides: what follows it is content, later markers included
    assert parser.extract_content_ids(a + [end] + b + [end] + a) == b + [end] + a
    assert parser.extract_content_ids(a + [end] + b + [call]) == b + [call]


@pytest.mark.parametrize(
    ("thinking", "output", "reasoning_text"),
    [
        (True, "abc def</think>ghi", "abc def"),
        (True, "one two" + CALL, "one two"),
        (True, "<think>x y</think>z", "x y"),
        (True, "ab cd</think>\n<think>ef</think>", "ab cd"),
        (True, "never ends", "never ends"),
        (False, "plain answer", ""),
        (False, "\n<think>content, not reasoning</think>answer", ""),
    ],
)
def test_count_reasoning_tokens(tok, thinking, output, reasoning_text):
    expected = len(tok.encode(reasoning_text, add_special_tokens=False)) if reasoning_text else 0
    assert parser_for(tok, thinking).count_reasoning_tokens(tok.encode(output, add_special_tokens=False)) == expected


def test_prompt_overrides_kwargs_when_streaming(tok):
    """The parser was told thinking is off, but the prompt leaves the turn inside <think>."""
    parser = parser_for(tok, False)
    prompt = prompt_ids(tok, chat_request(thinking=True))
    assert parser.is_reasoning_end(prompt) is False
    parser.adjust_initial_state_from_prompt(prompt)
    assert stream_directly(parser, token_deltas(tok, "abc</think>def")) == ("abc", "def")


@pytest.mark.parametrize("special", [False, True])
def test_adjust_request_keeps_markers_only_when_special(special):
    tok = tiny_tokenizer(special_markers=special)
    request = chat_request(tools=None)
    untouched = request.skip_special_tokens  # vLLM 0.32: True; 0.33: None (= True, decided later)
    parser_for(tok, True).adjust_request(request)
    assert request.skip_special_tokens is (False if special else untouched)
    ids = tok.encode("r</think>c", add_special_tokens=False)
    skip = request.skip_special_tokens is not False  # vLLM 0.33 decides None as True
    assert ("</think>" in tok.decode(ids, skip_special_tokens=skip)) is True


def test_in_tree_poolside_v1_swallows_the_tool_call_and_we_do_not(tok):
    """vLLM's own ``poolside_v1`` (the baseline of the issue) keeps the reasoning open past a
    ``<tool_call>``, so the call never reaches the tool parser."""
    from vllm.reasoning.poolside_v1_reasoning_parser import PoolsideV1ReasoningParser

    output = "Need the tool.\n" + CALL
    baseline = PoolsideV1ReasoningParser(tok, chat_template_kwargs={"enable_thinking": True})
    assert TOOL_CALL in (baseline.extract_reasoning(output, chat_request())[0] or "")
    assert parser_for(tok, True).extract_reasoning(output, chat_request()) == ("Need the tool.\n", CALL)


# -- properties --

_TEXT = st.text(alphabet=st.sampled_from(list("ab <>/\n\t_é東🙂\"'{}")), max_size=12)
_PIECES = st.lists(
    st.one_of(_TEXT, st.sampled_from([THINK, END_THINK, TOOL_CALL, "</tool_call>", "\n\n"])), max_size=10
)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=_PIECES, thinking=st.booleans())
def test_any_output_streams_token_by_token_to_the_complete_result(tok, pieces, thinking):
    output = "".join(pieces)
    complete = parser_for(tok, thinking).extract_reasoning(output, chat_request())
    assert stream_directly(parser_for(tok, thinking), token_deltas(tok, output)) == complete


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=_PIECES, thinking=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_composed_without_tool_parser_matches_complete(tok, pieces, thinking, cuts):
    """Through vLLM's ``DelegatingParser`` with only ``--reasoning-parser laguna``, several
    tokens per step: what clients get streamed equals the complete response, whatever
    ``<think>`` the model opens where (after the prompt or a delta ended the reasoning, vLLM
    no longer calls the reasoning parser)."""
    output = "".join(pieces)
    parser_cls = composed_parser_cls(tok, tools=False)
    request = chat_request(tools=None, thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, output)
    streamed = parse_streamed(
        parser_cls, tok, request, group(token_deltas(tok, output), cuts), prompt_ids(tok, request)
    )
    assert (streamed.reasoning, streamed.content) == (complete.reasoning, complete.content)


def expected_split(output: str, thinking: bool) -> tuple[str | None, str | None]:
    """The rule, written independently of the parser: with thinking on, the reasoning is the
    text up to the first ``</think>`` (dropped) or ``<tool_call>`` (kept), after one
    repeated ``<think>`` at the very start; everything else is content."""
    if not thinking:
        return None, output or None
    body = output.removeprefix(THINK)
    ends = [(i, m) for m in (END_THINK, TOOL_CALL) if (i := body.find(m)) >= 0]
    if not ends:
        return body or None, None
    i, marker = min(ends)
    content = body[i + len(END_THINK) :] if marker == END_THINK else body[i:]
    return body[:i] or None, content or None


_ANY_TEXT = st.lists(st.one_of(st.text(max_size=10), st.sampled_from([THINK, END_THINK, TOOL_CALL])), max_size=8)


@given(parts=_ANY_TEXT, thinking=st.booleans(), step=st.integers(1, 5))
def test_arbitrary_text_never_raises_and_follows_the_rule(parts, thinking, step):
    """Any text: complete, streamed in bare-text pieces (markers split) and token by token,
    each gives the rule's split; the token count of the reasoning follows the same rule.
    (A parser error would not raise here: the fail-safe would log it, which fails the test.)"""
    tok = tiny_tokenizer()
    text = "".join(parts)
    want = expected_split(text, thinking)
    assert parser_for(tok, thinking).extract_reasoning(text, chat_request()) == want
    parser = parser_for(tok, thinking)
    reasoning, content = stream_directly(parser, [(text[i : i + step], []) for i in range(0, len(text), step)])
    tail_reasoning, tail_content = parser._stream.finish()
    assert ((reasoning or "") + tail_reasoning or None, (content or "") + tail_content or None) == want
    assert stream_directly(parser_for(tok, thinking), token_deltas(tok, text)) == want
    # markers are single tokens, so the reasoning's tokens are those of its text
    ids = tok.encode(text, add_special_tokens=False)
    assert parser_for(tok, thinking).count_reasoning_tokens(ids) == len(tok.encode(want[0] or ""))


# -- the fail-safe --


def test_internal_error_is_logged_once_and_the_text_comes_back_as_content(tok, monkeypatch, parser_errors):
    """A bug in the splitter must not cost the response: the whole output is content, the
    error is logged once with its traceback (and, outside this test, fails the suite)."""
    from vllm_laguna.reasoning import splitter

    def broken(self, text, *, hold_partial=True):
        raise RuntimeError("planted")

    monkeypatch.setattr(splitter.ReasoningSplitter, "feed", broken)
    with parser_errors.expect() as records:
        assert parser_for(tok, True).extract_reasoning("abc</think>def", chat_request()) == (None, "abc</think>def")
        parser = parser_for(tok, True)
        deltas = token_deltas(tok, "abc</think>def")
        assert stream_directly(parser, deltas) == (None, "abc</think>def")
        assert parser.is_reasoning_end_streaming([], [])  # vLLM moves on to the tool parser
    assert len(records) == 2  # one per parser instance, not one per delta
    assert all(r.exc_info and isinstance(r.exc_info[1], RuntimeError) for r in records)
    assert "extract_reasoning_streaming" in records[1].getMessage()


def test_tokenizer_without_the_markers_is_refused_at_start():
    """``vllm serve --reasoning-parser laguna`` with a tokenizer lacking Laguna's marker
    tokens fails at start-up, naming them, rather than misparsing every response."""
    from vllm.parser import ParserManager

    import vllm_laguna

    vllm_laguna.register()
    plain = marker_free_tokenizer()
    with pytest.raises(ValueError, match=r"single tokens for \['<think>', '</think>', '<tool_call>', '<assistant>'\]"):
        parser_for(plain, True)
    with pytest.raises(TypeError, match=r"--reasoning-parser laguna cannot be used with the tokenizer.*<think>"):
        ParserManager.get_parser(reasoning_parser_name="laguna", tokenizer=plain)
