"""The ``laguna`` reasoning parser: where the reasoning of a Laguna turn ends, on text (the
serving layer) and on token ids (the engine core's structured-output gate), complete and
streamed; with the tiny tokenizer, whose ``<think>``/``</think>``/``<tool_call>`` are single
tokens and whose ``<arg_key>``/``<arg_value>`` span several."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from laguna_parsing import chat_request, composed_parser_cls, parse_streamed, prompt_ids, tiny_tokenizer, token_deltas

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
    "reopened-after-blanks": (True, "a</think>\n<think>b</think>\nc", "ab", "\n\nc"),
    "off-content": (False, "\nIt is sunny.", None, "\nIt is sunny."),
    "off-model-opens-think": (False, "\n<think>\nhmm\n</think>\nSunny.", "\nhmm\n", "\n\nSunny."),
    "off-model-opens-think-then-calls": (False, "<think>check" + CALL, "check", CALL),
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


def test_thinking_default_read_from_the_chat_template(tok):
    from transformers import AutoTokenizer

    thinking_first = AutoTokenizer.from_pretrained(tok.name_or_path)
    thinking_first.chat_template = thinking_first.chat_template.replace(
        "enable_thinking if enable_thinking is defined else false",
        "enable_thinking if enable_thinking is defined else true",
    )
    assert thinking_first.apply_chat_template(
        [{"role": "user", "content": "x"}], add_generation_prompt=True, tokenize=False
    ).endswith(THINK)
    assert parser_for(thinking_first, None).extract_reasoning("abc</think>def", chat_request()) == ("abc", "def")
    assert parser_for(thinking_first, False).extract_reasoning("abc</think>def", chat_request()) == (
        None,
        "abc</think>def",
    )


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
        ("reopened-after-blanks", "a"),
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
    assert parser.extract_content_ids(a + [vocab[END_THINK]] + b) == b
    assert parser.extract_content_ids(a + [vocab[TOOL_CALL]] + b) == [vocab[TOOL_CALL]] + b
    assert parser.extract_content_ids(a + b) == []


@pytest.mark.parametrize(
    ("thinking", "output", "reasoning_text"),
    [
        (True, "abc def</think>ghi", "abc def"),
        (True, "one two" + CALL, "one two"),
        (True, "<think>x y</think>z", "x y"),
        (False, "plain answer", ""),
        (False, "\n<think>hidden thought</think>answer", "hidden thought"),
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=_PIECES, thinking=st.booleans())
def test_any_output_streams_token_by_token_to_the_complete_result(tok, pieces, thinking):
    output = "".join(pieces)
    complete = parser_for(tok, thinking).extract_reasoning(output, chat_request())
    assert stream_directly(parser_for(tok, thinking), token_deltas(tok, output)) == complete


def _opens_after_handoff(output: str, thinking: bool) -> bool:
    """Whether a ``<think>`` opens where vLLM has already left the reasoning parser: at the
    start with thinking off (the prompt closed the reasoning), or right after the first
    ``</think>``. Only a tool parser sees that text; without one it stays content."""
    if thinking:
        ends = [i for i in (output.find(END_THINK), output.find(TOOL_CALL)) if i >= 0]
        if not ends or output.find(END_THINK) != min(ends):
            return False
        output = output.split(END_THINK, 1)[1]
    return output.lstrip().startswith(THINK)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pieces=_PIECES, thinking=st.booleans(), cuts=st.lists(st.integers(0, 40), max_size=8))
def test_composed_without_tool_parser_matches_complete(tok, pieces, thinking, cuts):
    """Through vLLM's ``DelegatingParser`` with only ``--reasoning-parser laguna``, several
    tokens per step: what clients get streamed equals the complete response."""
    from laguna_parsing import group, parse_complete

    output = "".join(pieces)
    if _opens_after_handoff(output, thinking):
        return
    parser_cls = composed_parser_cls(tok, tools=False)
    request = chat_request(tools=None, thinking=thinking)
    complete = parse_complete(parser_cls, tok, request, output)
    streamed = parse_streamed(
        parser_cls, tok, request, group(token_deltas(tok, output), cuts), prompt_ids(tok, request)
    )
    assert (streamed.reasoning, streamed.content) == (complete.reasoning, complete.content)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40), thinking=st.booleans(), step=st.integers(1, 5))
def test_arbitrary_text_never_raises(text, thinking, step):
    tok = tiny_tokenizer()
    parser = parser_for(tok, thinking)
    reasoning, content = parser.extract_reasoning(text, chat_request())
    parser.count_reasoning_tokens(tok.encode(text, add_special_tokens=False))
    streamed = stream_directly(parser_for(tok, thinking), [(text[i : i + step], []) for i in range(0, len(text), step)])
    assert all(isinstance(x, (str, type(None))) for x in (reasoning, content, *streamed))
