"""Structured output after reasoning, end to end: ``vllm serve --reasoning-parser laguna`` on a
scripted checkpoint, a chat request with a JSON-schema ``response_format`` and thinking on
gets free reasoning, then content that validates against the schema.

The script (``vllm_laguna.tiny.scripted``), after the generation prompt's last token:

- ``<think>`` (thinking on): reasoning in prose, then ``</think>``;
- after ``</think>``: prose (``SENTENCE``), then ``</assistant>``; a *fallback* chain gives
  ``</think>`` a second choice that starts a schema-valid JSON object (``ANSWER``).

Greedy decoding takes the fallback only where the grammar forbids the prose. So the JSON
content shows that the grammar applied from the token after ``</think>``, where the
``laguna`` parser says the reasoning ended, and the prose reasoning (no valid JSON) shows it
did not apply before. The same request without ``response_format`` gets the prose.
"""

from __future__ import annotations

import json

import pytest
from serving import vllm_serve

from vllm_laguna.tiny.scripted import build_scripted

pytestmark = pytest.mark.slow

REASONING = ["<think>", "\nThe user", " wants", " the sky", " as JSON.\n", "</think>"]
SENTENCE = ["</think>", "\nThe sky", " over Paris", " is clear.", "</assistant>"]
ANSWER = ["</think>", '{"city": "', "Paris", '", "sky": "', "clear", '"}', "</assistant>"]

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "sky": {"type": "string", "enum": ["clear", "cloudy"]}},
    "required": ["city", "sky"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "sky", "schema": SCHEMA, "strict": True}}
EXPECTED_REASONING = "".join(REASONING[1:-1])
EXPECTED_JSON = {"city": "Paris", "sky": "clear"}
MODEL = "laguna-json"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from openai import OpenAI

    root = tmp_path_factory.mktemp("laguna-json-server")
    checkpoint = build_scripted(root / "ckpt", [REASONING, SENTENCE], fallbacks=[ANSWER])
    flags = [
        "--served-model-name", MODEL, "--reasoning-parser", "laguna",
        "--dtype", "float32", "--max-model-len", "1024", "--max-num-seqs", "4", "--enforce-eager",
    ]  # fmt: skip
    with vllm_serve(checkpoint, root / "server.log", *flags) as url:
        yield OpenAI(base_url=url, api_key="unused", timeout=600, max_retries=0)


def chat(client, thinking: bool, **extra):
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "How is the sky in Paris?"}],
        temperature=0, max_tokens=48, extra_body={"chat_template_kwargs": {"enable_thinking": thinking}}, **extra,
    )  # fmt: skip


def validate(text: str) -> dict:
    """``text`` parsed as JSON and checked against ``SCHEMA`` (types, enum, keys)."""
    value = json.loads(text)
    assert set(value) == set(SCHEMA["required"]) and isinstance(value["city"], str)
    assert value["sky"] in SCHEMA["properties"]["sky"]["enum"]
    return value


def test_without_a_schema_the_script_answers_in_prose(client):
    message = chat(client, thinking=True).choices[0].message
    assert message.reasoning == EXPECTED_REASONING
    assert message.content == "".join(SENTENCE[1:-1])


def test_json_schema_binds_after_the_reasoning(client):
    response = chat(client, thinking=True, response_format=RESPONSE_FORMAT)
    choice = response.choices[0]
    assert choice.message.reasoning == EXPECTED_REASONING  # free prose, not JSON
    assert validate(choice.message.content) == EXPECTED_JSON
    assert choice.finish_reason == "stop"


def test_json_schema_binds_after_the_reasoning_streamed(client):
    reasoning, content = "", ""
    for chunk in chat(client, thinking=True, response_format=RESPONSE_FORMAT, stream=True):
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning", None) or ""
            content += choice.delta.content or ""
    assert reasoning == EXPECTED_REASONING
    assert validate(content) == EXPECTED_JSON


def test_thinking_off_the_schema_binds_from_the_first_token(client):
    message = chat(client, thinking=False, response_format=RESPONSE_FORMAT).choices[0].message
    assert not getattr(message, "reasoning", None)
    assert validate(message.content) == EXPECTED_JSON
