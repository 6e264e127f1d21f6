"""The causal-conv Triton kernels on CPU tensors through the Triton interpreter, against the
same reference and cases as the torch path (``tests/lfm2_helpers.py``). Run by
``tests/test_kernels_interpreter.py`` in a process with ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import os

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

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernels_interpreter.py"

from vllm_laguna.kernels.causal_conv1d_triton import (  # noqa: E402
    causal_conv1d_decode_triton,
    causal_conv1d_prefill_triton,
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(PREFILL_CASES))
def test_prefill_matches_reference(case, dtype):
    assert_prefill_matches_reference(causal_conv1d_prefill_triton, conv_batch(**PREFILL_CASES[case], dtype=dtype))


@pytest.mark.parametrize("case", list(DECODE_CASES))
def test_decode_matches_reference(case):
    assert_decode_matches_reference(causal_conv1d_decode_triton, conv_batch(**DECODE_CASES[case]))


def test_chunked_prompt_then_decode_equals_whole_sequence():
    assert_chunked_equals_whole(causal_conv1d_prefill_triton, causal_conv1d_decode_triton)


def test_fresh_request_ignores_stale_slot():
    assert_fresh_request_ignores_stale_slot(causal_conv1d_prefill_triton)
