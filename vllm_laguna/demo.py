"""``python -m vllm_laguna.demo``: what this plugin adds to vLLM, in one command, with nothing to download.

The checkpoint is a tiny Laguna (sliding-window and YaRN attention, sigmoid-routed MoE, the
XS.2 tokenizer layout and chat template) whose weights are set so that greedy decoding recites
a fixed script (:mod:`vllm_laguna.tiny.scripted`): thinking, the model reasons and then calls
a ``get_weather`` tool without closing its reasoning; not thinking, it says a sentence and
makes the same call. Its chat template thinks unless asked not to, as Laguna S-2.1's does
(XS.2's does not). The demo builds it once (cached under ``$XDG_CACHE_HOME/vllm-laguna`` or
``~/.cache/vllm-laguna``), starts ``vllm serve`` on it in the background, and meanwhile:

1. generates offline with ``LLM()``, which runs this package's Laguna class (vLLM's own
   Laguna crashes on the CPU backend), and prints the raw text;
2. sends one chat request with the tool through the ``openai`` client and prints the
   ``reasoning``, ``content`` and typed tool call the ``laguna`` parsers make of it;
3. streams the same request, printing each delta as it arrives;
4. sends it with ``enable_thinking=False``: content, then the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

#: the script, as chains of pieces (one token each); see vllm_laguna.tiny.scripted
THINKING = ["<think>", "The user", " wants the", " weather in Paris:", " a job for", " get_weather.", "<tool_call>"]
NOT_THINKING = ["</think>", "Let me", " check the", " forecast.", "<tool_call>"]
CALL = [
    "<tool_call>", "get_weather", "\n<arg_key>city</arg_key>\n<arg_value>", "Paris", ", France",
    "</arg_value>\n<arg_key>days</arg_key>\n<arg_value>", "3", "</arg_value>\n", "</tool_call>", "</assistant>",
]  # fmt: skip
SCRIPT = [THINKING, NOT_THINKING, CALL]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SERVED_NAME = "laguna-demo"
SERVE_ARGS = [
    "--served-model-name", SERVED_NAME, "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager",
    "--reasoning-parser", "laguna", "--tool-call-parser", "laguna", "--enable-auto-tool-choice",
]  # fmt: skip
MAX_TOKENS = 64
#: the fraction of GPU memory each of the two engines takes on CUDA
GPU_SHARE = 0.4


def checkpoint(cache_dir: Path | None = None) -> Path:
    """The demo's scripted checkpoint, built on first use; its directory name is a hash of the
    script and of the builder's sources (``vllm_laguna/tiny``), so a stale build is never reused."""
    from vllm_laguna import tiny
    from vllm_laguna.tiny.scripted import build_scripted

    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-laguna"
    digest = hashlib.sha256(json.dumps(SCRIPT).encode())
    for source in sorted(Path(tiny.__file__).parent.glob("*.*")):
        digest.update(source.read_bytes())
    key = digest.hexdigest()[:12]
    path = root / f"demo-{key}"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=root) as scratch:  # built whole, then renamed into place
            build_scripted(Path(scratch) / "ckpt", SCRIPT, special_markers=False, thinking_by_default=True)
            (Path(scratch) / "ckpt").rename(path)
    return path


def say(text: str = "") -> None:
    print(text, flush=True)


def field(name: str, value: object) -> None:
    say(f"    {name:<14} {value}")


def part(number: int, what: str) -> None:
    say(f"\n[{number}] {what}")


@contextlib.contextmanager
def output_to(log: Path):
    """Send everything written to this process's stdout and stderr (vLLM's logs, warnings
    from C++, progress bars) to ``log``; on an error, show the log's tail."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    out = log.open("a")
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
    failed = True
    try:
        yield
        failed = False
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, target in zip(saved, (1, 2)):
            os.dup2(fd, target)
            os.close(fd)
        out.close()
        if failed:
            print(f"--- the end of {log} ---\n{log.read_text()[-4000:]}", file=sys.stderr)


def offline(model: Path, log: Path, gpu_share: float | None) -> None:
    """Part 1: LLM() in this process (the ``uni`` executor), raw greedy text."""
    with output_to(log):
        from vllm import LLM, SamplingParams

        share = {} if gpu_share is None else {"gpu_memory_utilization": gpu_share}
        llm = LLM(model=str(model), dtype="float32", max_model_len=2048, enforce_eager=True,
                  distributed_executor_backend="uni", **share)  # fmt: skip
        (model_class,) = llm.apply_model(lambda m: f"{type(m).__module__}:{type(m).__qualname__}")
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
        (out,) = llm.chat(MESSAGES, params, tools=TOOLS, use_tqdm=False)
        prompt_end = llm.get_tokenizer().decode(out.prompt_token_ids[-3:])
        llm.llm_engine.engine_core.shutdown()
    field("model class", model_class)
    field("prompt ends", f"{prompt_end!r}  (the template opened the reasoning: it thinks by default)")
    field("raw output", repr(out.outputs[0].text))


def ask(client, stream: bool, **extra):
    return client.chat.completions.create(
        model=SERVED_NAME, messages=MESSAGES, tools=TOOLS, temperature=0, max_tokens=MAX_TOKENS, stream=stream, **extra
    )


def complete(client, **extra) -> None:
    """One non-streamed response: its reasoning, content, tool calls and finish reason."""
    choice = ask(client, stream=False, **extra).choices[0]
    field("reasoning", repr(getattr(choice.message, "reasoning", None)))
    field("content", repr(choice.message.content))
    for call in choice.message.tool_calls or []:
        arguments = json.loads(call.function.arguments)
        types = ", ".join(f"{k} {type(v).__name__}" for k, v in arguments.items())
        field("tool call", f"{call.function.name} {call.function.arguments}  (typed by the tool's schema: {types})")
    field("finish_reason", choice.finish_reason)


def streamed(client) -> None:
    """Each delta of a streamed response, on its own line as it arrives."""
    for chunk in ask(client, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            if getattr(delta, "reasoning", None):
                field("reasoning +", repr(delta.reasoning))
            if delta.content:
                field("content +", repr(delta.content))
            for call in delta.tool_calls or []:
                if call.function and call.function.name:
                    field("tool call", f"#{call.index} {call.function.name}  (id {call.id})")
                if call.function and call.function.arguments:
                    field("arguments +", repr(call.function.arguments))
            if choice.finish_reason:
                field("finish_reason", choice.finish_reason)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m vllm_laguna.demo", description=__doc__.split("\n\n")[0])
    parser.parse_args(argv)
    started = time.monotonic()

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, plenty here; ignored on CUDA
    server_env = dict(os.environ)  # the server runs as a user starts it
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # part 1's engine runs in this process
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from vllm_laguna.local_server import LocalServer

    say("vllm-laguna demo: a tiny Laguna checkpoint built here, nothing downloaded")
    model = checkpoint()
    say(f"checkpoint  {model}")
    say("            its weights make greedy decoding recite a script: while thinking, a get_weather call")
    import torch

    # on a GPU both engines share it; on CPU the KV-cache size above is all they take
    gpu_share = GPU_SHARE if torch.cuda.is_available() else None
    serve_args = SERVE_ARGS + ([] if gpu_share is None else ["--gpu-memory-utilization", str(gpu_share)])
    logs = Path(tempfile.mkdtemp(prefix="vllm-laguna-demo-"))
    with LocalServer(model, serve_args, log=logs / "server.log", env=server_env) as server:
        say(f"starting    vllm serve {model} {' '.join(serve_args)}")
        say(f"            in the background; vLLM's logs go to {logs}")

        part(1, "LLM() offline: vLLM runs this package's Laguna class (vLLM's own Laguna crashes on the CPU backend)")
        offline(model, logs / "offline.log", gpu_share)

        server.wait_healthy(timeout=600)
        client = server.client()
        part(2, "vllm serve + openai client, a chat request with a tool: the laguna parsers end the reasoning "
             "where the tool call starts and type its arguments")  # fmt: skip
        complete(client)
        part(3, "The same request streamed: each delta as it arrives")
        streamed(client)
        part(4, "enable_thinking=False: content, then the same call")
        complete(client, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    shutil.rmtree(logs)
    say("\nFor comparison, vLLM's in-tree --reasoning-parser poolside_v1 on this checkpoint returns [2]'s reasoning as")
    say("content (it misses the template's thinking default, as in Laguna S-2.1), and with enable_thinking=True it")
    say("keeps the tool call inside the reasoning (no tool_calls, finish_reason 'stop').")
    say(f"\ndone in {time.monotonic() - started:.0f} s. Serve it yourself: VLLM_CPU_KVCACHE_SPACE=1 vllm serve {model} "
        f"{' '.join(serve_args[2:])}")  # fmt: skip


if __name__ == "__main__":
    main()
