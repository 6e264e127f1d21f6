"""The causal-conv kernels' contract, against a per-request ``F.conv1d`` reference written
the way transformers computes LFM2's conv: the torch path here, the Triton kernels under
the Triton interpreter in a process of their own (``tests/lfm2_triton_interpret.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lfm2_helpers import (
    DECODE_CASES,
    PREFILL_CASES,
    assert_chunked_equals_whole,
    assert_decode_matches_reference,
    assert_fresh_request_ignores_stale_slot,
    assert_prefill_matches_reference,
    conv_batch,
)
from vllm_laguna.kernels import causal_conv1d
from vllm_laguna.kernels.causal_conv1d import causal_conv1d_decode_torch, causal_conv1d_prefill_torch

TESTS = Path(__file__).parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case, dtype):
    assert_prefill_matches_reference(causal_conv1d_prefill_torch, conv_batch(**PREFILL_CASES[case], dtype=dtype))


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(case):
    assert_decode_matches_reference(causal_conv1d_decode_torch, conv_batch(**DECODE_CASES[case]))


def test_chunked_prompt_then_decode_equals_whole_sequence():
    assert_chunked_equals_whole(causal_conv1d_prefill_torch, causal_conv1d_decode_torch)


def test_fresh_request_ignores_stale_slot():
    assert_fresh_request_ignores_stale_slot(causal_conv1d_prefill_torch)


def test_dispatch_uses_torch_on_cpu_and_when_forced(monkeypatch):
    cpu = torch.zeros(1)
    assert not causal_conv1d.use_triton(cpu)
    cuda_like = torch.empty(1, device="meta")
    monkeypatch.setattr(type(cuda_like), "is_cuda", property(lambda self: True))
    assert causal_conv1d.use_triton(cuda_like)
    monkeypatch.setattr(causal_conv1d, "FORCE_TORCH", True)
    assert not causal_conv1d.use_triton(cuda_like)


def test_triton_kernels_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    env.pop("VLLM_LAGUNA_TORCH_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(TESTS / "lfm2_triton_interpret.py"), "-q", "-p", "no:cacheprovider"],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
