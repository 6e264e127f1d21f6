"""Fused sigmoid top-k router (Triton interpreter, CPU) against its torch reference.

Ids must be identical (order, ties to the lowest index, NaN/Inf rows); weights within 1e-6
absolute.
Each batch mixes ordinary rows with the awkward ones: all NaN, all +-Inf, NaN/Inf mixed,
all equal, coarsely quantised (many ties), +-0.0 together, +Inf beside FLT_MAX.
"""

from __future__ import annotations

import importlib

import pytest
import torch

from vllm_laguna import kernels
from vllm_laguna.kernels import dispatch
from vllm_laguna.kernels.sigmoid_topk import llama4_topk_reference, sigmoid_topk_reference

assert dispatch.TRITON_INTERPRET, "run through tests/test_kernels_interpreter.py"
# The package exports the function ``sigmoid_topk``, which hides the module of that name.
routing = importlib.import_module("vllm_laguna.kernels.sigmoid_topk")

FLT_MAX = torch.finfo(torch.float32).max
EXPERTS_TOP_K = [(8, 1), (8, 2), (8, 8)] + [(e, k) for e in (60, 128, 256, 512) for k in (1, 2, 8, 32)]
# Laguna options, rotated over the cases: (bias dtype or None, softcap, scale, renormalize,
# score function). The soft-caps leave these logits (std 3) unsaturated: the interpreter's
# exp/tanh are numpy's, an ulp away from torch's CPU ones, and saturated scores would bunch
# into ulp-level near-ties that either side may order differently (on a GPU the kernel uses
# torch's own CUDA math).
OPTIONS = [
    (torch.float32, 0.0, 2.5, True, "sigmoid"),
    (torch.float32, 8.0, 1.0, True, "sqrtsoftplus"),
    (None, 20.0, 1.0, False, "sigmoid"),
    (torch.bfloat16, 0.0, 2.5, False, "sigmoid"),
    (torch.float32, 0.0, 2.5, True, "sqrtsoftplus"),
    (torch.bfloat16, 20.0, 1.0, False, "sqrtsoftplus"),
]


def _special_rows(experts: int) -> list[torch.Tensor]:
    nan, inf = float("nan"), float("inf")
    mixed = torch.randn(experts)
    mixed[::3], mixed[1::3] = nan, inf
    zeros = torch.zeros(experts)
    zeros[1::2] = -0.0
    inf_vs_max = torch.randn(experts)
    inf_vs_max[-1], inf_vs_max[experts // 2] = inf, FLT_MAX
    return [
        torch.full((experts,), nan),
        torch.full((experts,), inf),
        torch.full((experts,), -inf),
        mixed,
        torch.full((experts,), 0.25),
        torch.round(torch.randn(experts) * 2) / 2,
        zeros,
        inf_vs_max,
    ]


def _logits(tokens: int, experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    x = torch.randn(tokens, experts) * 3
    if tokens > 1:
        specials = _special_rows(experts)
        for row in range(1, tokens):
            x[row] = specials[(row - 1 + seed) % len(specials)] if row <= len(specials) else x[row]
    return x.to(dtype)


def _bias(experts: int, dtype: torch.dtype | None, seed: int) -> torch.Tensor | None:
    if dtype is None:
        return None
    torch.manual_seed(seed + 1)
    # Quantised so that biased scores tie too.
    return (torch.round(torch.randn(experts) * 8) / 64).to(dtype)


def _assert_routing_equal(got, want, experts: int) -> None:
    weights, ids = got
    want_weights, want_ids = want
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=0)
    assert ((ids >= 0) & (ids < experts)).all()
    assert all(len(set(row)) == ids.shape[1] for row in ids.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("experts", "top_k"), EXPERTS_TOP_K)
def test_router_matches_reference(experts, top_k, dtype):
    case = EXPERTS_TOP_K.index((experts, top_k))
    for shift, tokens in enumerate((17, 3, 1)):
        bias_dtype, softcap, scale, renormalize, score_func = OPTIONS[(case + shift) % len(OPTIONS)]
        logits = _logits(tokens, experts, dtype, seed=case + shift)
        bias = _bias(experts, bias_dtype, seed=case)
        got = kernels.sigmoid_topk(
            logits,
            bias,
            top_k,
            softcap=softcap,
            routed_scaling_factor=scale,
            renormalize=renormalize,
            score_func=score_func,
        )
        want = sigmoid_topk_reference(logits, bias, top_k, softcap, scale, renormalize, score_func)
        _assert_routing_equal(got, want, experts)
    logits = _logits(17, experts, dtype, seed=case + 7)
    _assert_routing_equal(kernels.llama4_topk(logits, top_k), llama4_topk_reference(logits, top_k), experts)


def test_router_strided_logits_and_empty_batch():
    wide = _logits(9, 300, torch.float32, seed=3)
    logits = wide[:, 20:276]  # row stride 300, 256 experts
    bias = _bias(256, torch.float32, seed=3)
    want = sigmoid_topk_reference(logits, bias, 8, 0.0, 2.5)
    _assert_routing_equal(kernels.sigmoid_topk(logits, bias, 8, routed_scaling_factor=2.5), want, 256)
    weights, ids = kernels.sigmoid_topk(torch.empty(0, 64), None, 4)
    assert weights.shape == ids.shape == (0, 4)


def test_router_falls_back_beyond_kernel_limits(monkeypatch):
    def fail(*args):
        raise AssertionError("the fused kernel must not run for this shape")

    monkeypatch.setattr(routing, "_fused_sigmoid_topk", fail)
    monkeypatch.setattr(routing, "_fused_llama4_topk", fail)
    for experts, top_k in ((routing.MAX_FUSED_EXPERTS + 88, 4), (64, routing.MAX_FUSED_TOP_K + 1)):
        logits = _logits(5, experts, torch.float32, seed=5)
        got = kernels.sigmoid_topk(logits, None, top_k)
        _assert_routing_equal(got, sigmoid_topk_reference(logits, None, top_k), experts)
        want = llama4_topk_reference(logits, top_k)
        _assert_routing_equal(kernels.llama4_topk(logits, top_k), want, experts)


def test_router_ops_pass_opcheck():
    logits = _logits(6, 24, torch.bfloat16, seed=11)
    bias = _bias(24, torch.float32, seed=11)
    op = torch.ops.vllm_laguna.sigmoid_topk.default
    torch.library.opcheck(op, (logits, bias, 3, 8.0, 2.5, True, "sigmoid"))
    torch.library.opcheck(op, (logits, None, 3, 0.0, 1.0, False, "sigmoid"))
    torch.library.opcheck(op, (logits, bias, 3, 0.0, 2.5, True, "sqrtsoftplus"))
    torch.library.opcheck(torch.ops.vllm_laguna.llama4_topk.default, (logits, 3))


def test_router_under_torch_compile_is_one_opaque_op():
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.backends.debugging.aot_eager(gm, example_inputs)

    def route(logits, bias):
        weights, ids = kernels.sigmoid_topk(logits, bias, 8, softcap=0.0, routed_scaling_factor=2.5)
        return weights, ids, kernels.llama4_topk(logits, 8)

    torch._dynamo.reset()
    compiled = torch.compile(route, backend=backend, fullgraph=True, dynamic=True)
    bias = _bias(128, torch.float32, seed=2)
    for tokens in (5, 9):
        logits = _logits(tokens, 128, torch.float32, seed=tokens)
        weights, ids, llama4 = compiled(logits, bias)
        _assert_routing_equal((weights, ids), sigmoid_topk_reference(logits, bias, 8, 0.0, 2.5), 128)
        _assert_routing_equal(llama4, llama4_topk_reference(logits, 8), 128)
    nodes = [node for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    ops = [node.target for node in nodes if isinstance(node.target, torch._ops.OpOverloadPacket)]
    assert ops == [torch.ops.vllm_laguna.sigmoid_topk, torch.ops.vllm_laguna.llama4_topk]
    assert len(graphs) == 1  # the second token count reused the dynamic graph
