"""Llama 4 text as users run it: bf16 in vLLM's default compiled mode (no ``enforce_eager``),
against exact arithmetic within the bf16 bounds (``harness.BF16``), on prompts across the
attention chunk (128) and past ``floor_scale`` (temperature tuning on)."""

from __future__ import annotations

from harness import BF16, low_precision_gaps, prompts_for, vllm_run
from vllm_laguna.tiny.llama4 import build_llama4

PROMPTS = prompts_for(512, [5, 9, 12, 20, 33, 40, 64, 100, 129, 150, 200, 290])


def test_bf16_compiled_close_to_exact(tmp_path):
    ckpt = build_llama4(tmp_path / "llama4")
    results, _ = vllm_run(
        ckpt, PROMPTS, max_new_tokens=24, dtype="bfloat16", enforce_eager=False, prompt_logprobs=True
    )
    print(low_precision_gaps(ckpt, PROMPTS, results).assert_within(BF16))
