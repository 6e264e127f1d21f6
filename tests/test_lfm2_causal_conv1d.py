"""The causal-conv kernels' contract, against a per-request ``F.conv1d`` reference written
the way transformers computes LFM2's conv: the torch path here, the Triton kernels under
the Triton interpreter in a process of their own
(``tests/kernels_interpret/test_causal_conv1d.py``)."""

from __future__ import annotations

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
from vllm_laguna.kernels.causal_conv1d import causal_conv1d_decode_torch, causal_conv1d_prefill_torch


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
