"""README command 3, ``python -m vllm_laguna.demo``, run as a user runs it (a fresh cache, so
the checkpoint is built), and its printout read for what each part claims to show."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from vllm_laguna import demo

pytestmark = pytest.mark.slow


def fields(block: str) -> list[tuple[str, str]]:
    """(name, value) of each ``    name  value`` line of one part."""
    return [(m[1].strip(), m[2]) for m in re.finditer(r"^    (\S+(?: \S+)?(?: \+)?)\s{2,}(.*)$", block, re.MULTILINE)]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cache = tmp_path_factory.mktemp("xdg-cache")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_") or k == "VLLM_CACHE_ROOT"}
    env["XDG_CACHE_HOME"] = str(cache)
    out = subprocess.run([sys.executable, "-m", "vllm_laguna.demo"], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    parts = re.split(r"^\[(\d)\] ", out.stdout, flags=re.MULTILINE)
    return out.stdout, cache, {int(n): fields(body) for n, body in zip(parts[1::2], parts[2::2])}


REASONING = "".join(demo.THINKING[1:-1])
CONTENT = "".join(demo.NOT_THINKING[1:-1])
CALL = ("get_weather", {"city": "Paris, France", "days": 3})


def test_only_the_demo_speaks(run):
    """vLLM's logs, C++ warnings and progress bars go to the log files, not the screen."""
    stdout, _, _ = run
    assert not re.search(r"^\(\w+ pid=|^(INFO|WARNING)\b|Loading safetensors", stdout, re.MULTILINE), stdout
    assert sorted(run[2]) == [1, 2, 3, 4]


def test_offline_llm_runs_our_class_and_recites_the_script(run):
    got = dict(run[2][1])
    assert got["model class"] == "vllm_laguna.model_executor.models.laguna:LagunaForCausalLM"
    assert got["prompt ends"].startswith(repr("<assistant>\n<think>"))
    raw = eval(got["raw output"])
    assert raw == "".join(demo.THINKING[1:]) + "".join(demo.CALL[1:-1])


def test_server_splits_reasoning_and_types_the_call(run):
    got = run[2][2]
    assert dict(got)["reasoning"] == repr(REASONING)  # thinking by the template's default, ended by the call
    assert dict(got)["content"] == "None"
    (call,) = [value for name, value in got if name == "tool call"]
    name, arguments = call.split(" ", 1)
    assert (name, json.JSONDecoder().raw_decode(arguments)[0]) == CALL
    assert call.endswith("(typed by the tool's schema: city str, days int)")
    assert dict(got)["finish_reason"] == "tool_calls"


def test_streamed_deltas_add_up_to_the_same_answer(run):
    got = run[2][3]
    assert "".join(eval(v) for n, v in got if n == "reasoning +") == REASONING
    assert not [v for n, v in got if n == "content +"]
    (call,) = [v for n, v in got if n == "tool call"]
    assert call.startswith("#0 get_weather  (id ")
    assert json.loads("".join(eval(v) for n, v in got if n == "arguments +")) == CALL[1]
    assert [v for n, v in got if n == "finish_reason"] == ["tool_calls"]
    # the order a client sees: reasoning, then the call's name, then its arguments
    names = [n for n, _ in got]
    assert names.index("tool call") > max(i for i, n in enumerate(names) if n == "reasoning +")
    assert names.index("tool call") < names.index("arguments +")


def test_thinking_off_gives_content_then_the_call(run):
    got = dict(run[2][4])
    assert (got["reasoning"], got["content"]) == ("None", repr(CONTENT))
    assert got["tool call"].startswith('get_weather {"city": "Paris, France", "days": 3}')


def test_the_checkpoint_is_built_once(run):
    _, cache, _ = run
    (built,) = (cache / "vllm-laguna").iterdir()
    stamp = (built / "config.json").stat().st_mtime_ns
    assert demo.checkpoint(cache / "vllm-laguna") == built
    assert (built / "config.json").stat().st_mtime_ns == stamp
