"""Fused softplus output gate (Triton interpreter, CPU) against its torch reference.

Tolerances: fp32 1e-6 relative; fp16 one ulp; bf16 two ulps (2**-6 relative), because the
Triton 3.9 interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest-even
(``test_kernels_sm90_lowering`` checks the GPU code rounds).
"""

from __future__ import annotations

import pytest
import torch

from vllm_laguna import kernels
from vllm_laguna.kernels import dispatch
from vllm_laguna.kernels.gated_output import softplus_gate_reference

assert dispatch.TRITON_INTERPRET, "run through tests/test_kernels_interpreter.py"

TOLERANCE = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=2**-10, atol=1e-6),
    torch.bfloat16: dict(rtol=2**-6, atol=1e-6),
}
DTYPES = pytest.mark.parametrize("dtype", list(TOLERANCE), ids=["fp32", "fp16", "bf16"])
# (heads, head_dim): one head, odd head counts, Laguna's 48/64 x 128, non-powers of two.
HEAD_SHAPES = [(1, 32), (3, 80), (5, 96), (8, 64), (48, 128), (64, 128), (7, 40), (2, 256)]


def _inputs(tokens, heads, head_dim, dtype, per_element, seed, specials=True):
    torch.manual_seed(seed)
    attn = torch.randn(tokens, heads * head_dim).to(dtype)
    gate = torch.randn(tokens, heads * head_dim if per_element else heads) * 6
    if specials:  # past softplus' threshold (20), where exp(x) underflows, non-finite
        values = torch.tensor([25.0, 20.0, -120.0, float("inf"), float("-inf"), float("nan")])
        gate.view(-1)[: values.numel()] = values[: gate.numel()]
    return attn, gate.to(dtype)


def _assert_gate_close(attn, gate, head_dim):
    got = kernels.softplus_gate(attn, gate, head_dim)
    want = softplus_gate_reference(attn, gate, head_dim)
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCE[attn.dtype])


@DTYPES
@pytest.mark.parametrize("per_element", [False, True], ids=["per-head", "per-element"])
@pytest.mark.parametrize(("heads", "head_dim"), HEAD_SHAPES)
def test_gate_matches_reference(heads, head_dim, per_element, dtype):
    for seed, tokens in enumerate((1, 3, 17)):
        attn, gate = _inputs(tokens, heads, head_dim, dtype, per_element, seed)
        _assert_gate_close(attn, gate, head_dim)


@pytest.mark.parametrize("per_element", [False, True], ids=["per-head", "per-element"])
def test_gate_reads_strided_rows(per_element):
    """attn sliced out of a wider buffer (row stride > width), gate likewise."""
    heads, head_dim = 6, 80
    attn, gate = _inputs(9, heads + 2, head_dim, torch.bfloat16, per_element, seed=4)
    attn = attn[:, head_dim : head_dim * (heads + 1)]
    gate = gate[:, head_dim : head_dim * (heads + 1)] if per_element else gate[:, 1 : heads + 1]
    _assert_gate_close(attn, gate, head_dim)
    assert kernels.softplus_gate(attn[:0], gate[:0], head_dim).shape == (0, heads * head_dim)


def test_gate_op_passes_opcheck():
    for per_element in (False, True):
        attn, gate = _inputs(4, 3, 80, torch.bfloat16, per_element, seed=1, specials=False)
        torch.library.opcheck(torch.ops.vllm_laguna.softplus_gate.default, (attn, gate, 80))


def test_gate_under_torch_compile_is_one_opaque_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(kernels.softplus_gate, backend=backend, fullgraph=True, dynamic=True)
    for tokens in (5, 11):
        attn, gate = _inputs(tokens, 4, 64, torch.bfloat16, False, seed=tokens, specials=False)
        torch.testing.assert_close(
            compiled(attn, gate, 64), softplus_gate_reference(attn, gate, 64), **TOLERANCE[torch.bfloat16]
        )
    nodes = [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    ops = [node.target for node in nodes if isinstance(node.target, torch._ops.OpOverloadPacket)]
    assert ops == [torch.ops.vllm_laguna.softplus_gate]  # the rest is symbolic shape arithmetic
    assert len(graphs) == 1
