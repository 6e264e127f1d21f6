"""LFM2 with tensor parallelism 2 on the CPU backend (one core per rank) against
transformers: conv channels, their state slots and the conv bias split across ranks, and a
single KV head replicated on both. (The compiled mode, where the graph splits on the conv
op, runs in ``test_lfm2_modes.py``.)"""

from __future__ import annotations

from harness import assert_parity, hf_greedy, prompts_for, vllm_greedy
from vllm_laguna.tiny.lfm2 import build_lfm2

PROMPTS = prompts_for(512, [1, 20, 150], seed=5)


def test_tensor_parallel_2(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = build_lfm2(tmp_path / "tp", config_form="hub", conv_bias=True, block_ffn_dim_multiplier=1.5, seed=6)
    expected = hf_greedy(ckpt, PROMPTS)
    actual = vllm_greedy(ckpt, PROMPTS, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert_parity(expected, actual)
