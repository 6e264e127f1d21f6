"""LFM2 as users run it: bf16 in vLLM's default compiled mode (no ``enforce_eager``), against
exact arithmetic within the bf16 bounds (``harness.BF16``), through the conv-state cache on
prompts shorter than the conv state and longer than a KV-cache block."""

from __future__ import annotations

from harness import BF16, low_precision_gaps, prompts_for, vllm_run
from vllm_laguna.tiny.lfm2 import build_lfm2

PROMPTS = prompts_for(512, [1, 2, 5, 9, 20, 33, 64, 100, 129, 150, 200, 300], seed=1)


def test_bf16_compiled_close_to_exact(tmp_path):
    ckpt = build_lfm2(tmp_path / "lfm2")
    results, _ = vllm_run(
        ckpt, PROMPTS, max_new_tokens=24, dtype="bfloat16", enforce_eager=False, prompt_logprobs=True
    )
    print(low_precision_gaps(ckpt, PROMPTS, results).assert_within(BF16))
