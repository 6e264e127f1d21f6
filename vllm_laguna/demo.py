"""``python -m vllm_laguna.demo``: Laguna in vLLM end to end, with nothing to download.

Builds the tiny Laguna checkpoint once (random weights, every Laguna feature; cached under
``$XDG_CACHE_HOME/vllm-laguna`` or ``~/.cache/vllm-laguna``), loads it with vLLM's offline
``LLM`` through this plugin, and generates from a chat prompt and a plain one. The weights
are random, so the text is gibberish: what the demo shows is the path working (plugin
registration, config parsing, weight loading, sigmoid-routed MoE, sliding-window and YaRN
attention, the chat template).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def tiny_checkpoint(cache_dir: Path | None = None) -> Path:
    """The cached default tiny Laguna checkpoint, built on first use."""
    from vllm_laguna.tiny.laguna import build_laguna

    root = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vllm-laguna"
    path = root / "tiny-laguna"
    if not (path / "model.safetensors.index.json").exists():
        build_laguna(path)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_laguna.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a Laguna checkpoint (default: the tiny one, built on first use)")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; ignored on CUDA
    model = args.model or str(tiny_checkpoint())
    print(f"model: {model}")

    from vllm import LLM, ModelRegistry, SamplingParams

    llm = LLM(model=model, max_model_len=2048, enforce_eager=True)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    chat_out = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    text_out = llm.generate(["The capital of France is"], params, use_tqdm=False)[0].outputs[0]
    entry = ModelRegistry.models["LagunaForCausalLM"]
    print(f"model class: {entry.module_name}:{entry.class_name}")
    print(f"chat      -> {chat_out.text!r}")
    print(f"generate  -> {text_out.text!r}")
    if not args.model:
        print("(random weights: the text is gibberish by design)")
        print(f"serve it:  vllm serve {model} --reasoning-parser laguna --tool-call-parser laguna "
              "--enable-auto-tool-choice")


if __name__ == "__main__":
    main()
