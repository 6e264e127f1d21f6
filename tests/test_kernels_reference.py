"""The torch references hold the contract the fused kernels are tested against.

Selection is checked against a plain-Python ranking (NaN last, +-Inf as +-FLT_MAX, ties to
the lowest index) and hand-computed rows, so the reference is not its own oracle.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vllm_laguna.kernels.gated_output import softplus_gate_reference
from vllm_laguna.kernels.sigmoid_topk import llama4_topk_reference, sigmoid_topk_reference

FLT_MAX = torch.finfo(torch.float32).max
NAN, INF = float("nan"), float("inf")


def _ranked(keys: list[float], top_k: int) -> list[int]:
    def rank(value: float) -> float:
        return -INF if math.isnan(value) else max(-FLT_MAX, min(FLT_MAX, value))

    return sorted(range(len(keys)), key=lambda e: (-rank(keys[e]), e))[:top_k]


def _python_route(logits, bias, top_k, softcap, scale, renormalize, score_func):
    capped = torch.tanh(logits.float() / softcap) * softcap if softcap else logits.float()
    if score_func == "sigmoid":
        scores = torch.sigmoid(capped)
    else:  # mlx-lm's sqrtsoftplus, softplus written as logaddexp(x, 0); +-Inf as +-FLT_MAX
        finite = capped.clamp(-FLT_MAX, FLT_MAX)
        scores = torch.sqrt(torch.logaddexp(finite, torch.zeros_like(finite)))
    keys = scores + bias.float() if bias is not None else scores
    ids, weights = [], []
    for row_keys, row_scores in zip(keys.tolist(), scores.tolist()):
        chosen = _ranked(row_keys, top_k)
        w = [0.0 if math.isnan(row_scores[e]) else row_scores[e] for e in chosen]
        total = sum(w)
        if renormalize and total > 0:
            w = [x / total for x in w]
        ids.append(chosen)
        weights.append([x * scale for x in w])
    return torch.tensor(weights), torch.tensor(ids, dtype=torch.int32)


def _rows(experts: int) -> torch.Tensor:
    torch.manual_seed(experts)
    rows = torch.randn(12, experts) * 3
    rows[1] = NAN
    rows[2] = INF
    rows[3] = -INF
    rows[4, ::2] = NAN
    rows[5] = 0.5
    rows[6] = torch.round(rows[6])  # many ties
    rows[7, 1::2] = -0.0
    rows[7, ::2] = 0.0
    rows[8, -1], rows[8, 0] = INF, FLT_MAX
    return rows


@pytest.mark.parametrize("score_func", ["sigmoid", "sqrtsoftplus"])
@pytest.mark.parametrize(
    ("experts", "top_k", "softcap", "scale", "renormalize", "with_bias"),
    [
        (16, 4, 0.0, 2.5, True, True),
        (37, 8, 3.0, 1.0, True, False),
        (64, 16, 0.0, 1.0, False, True),
        (9, 9, 8.0, 2.0, True, True),
    ],
)
def test_sigmoid_topk_reference_matches_python_ranking(
    experts, top_k, softcap, scale, renormalize, with_bias, score_func
):
    logits = _rows(experts)
    bias = torch.round(torch.randn(experts) * 4) / 32 if with_bias else None
    weights, ids = sigmoid_topk_reference(logits, bias, top_k, softcap, scale, renormalize, score_func)
    want_weights, want_ids = _python_route(logits, bias, top_k, softcap, scale, renormalize, score_func)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights, atol=1e-6, rtol=1e-6)


def test_sqrtsoftplus_by_hand_picks_other_experts_than_sigmoid():
    """logits [0, 4], bias [0.5, 0], top-1: sigmoid keys [1.0, 0.982] pick expert 0;
    sqrt(softplus) keys [sqrt(ln 2) + 0.5, sqrt(ln(1 + e^4))] = [1.33, 2.00] pick expert 1,
    whose weight renormalises to 1 and is then scaled."""
    logits, bias = torch.tensor([[0.0, 4.0]]), torch.tensor([0.5, 0.0])
    _, ids = sigmoid_topk_reference(logits, bias, 1, score_func="sigmoid")
    assert ids.tolist() == [[0]]
    weights, ids = sigmoid_topk_reference(logits, bias, 1, routed_scaling_factor=2.5, score_func="sqrtsoftplus")
    assert ids.tolist() == [[1]] and weights.tolist() == [[2.5]]
    weights, ids = sigmoid_topk_reference(logits, bias, 2, renormalize=False, score_func="sqrtsoftplus")
    assert ids.tolist() == [[1, 0]]
    torch.testing.assert_close(weights[0], torch.tensor([math.sqrt(math.log1p(math.exp(4.0))), math.sqrt(math.log(2.0))]))
    with pytest.raises(ValueError, match="'softmax'.*'sigmoid', 'sqrtsoftplus'"):
        sigmoid_topk_reference(logits, bias, 1, score_func="softmax")


@pytest.mark.parametrize("top_k", [1, 5])
def test_llama4_topk_reference_matches_python_ranking(top_k):
    logits = _rows(24).to(torch.bfloat16)
    weights, ids = llama4_topk_reference(logits, top_k)
    want_ids = torch.tensor([_ranked(row, top_k) for row in logits.float().tolist()], dtype=torch.int32)
    assert torch.equal(ids, want_ids)
    chosen = logits.float().gather(1, want_ids.long())
    torch.testing.assert_close(weights, torch.nan_to_num(torch.sigmoid(chosen), nan=0.0))


def test_degenerate_rows_by_hand():
    logits = torch.tensor([[NAN] * 6, [INF] * 6, [1.0, 3.0, 3.0, -INF, NAN, 2.0]])
    weights, ids = sigmoid_topk_reference(logits, None, 3, routed_scaling_factor=2.0)
    assert ids.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 5]]
    assert weights[0].tolist() == [0.0, 0.0, 0.0]  # nothing to renormalise: stays zero
    torch.testing.assert_close(weights[1], torch.full((3,), 2.0 / 3))
    s3, s2 = torch.sigmoid(torch.tensor(3.0)), torch.sigmoid(torch.tensor(2.0))
    torch.testing.assert_close(weights[2], torch.stack([s3, s3, s2]) / (2 * s3 + s2) * 2.0)
    weights, ids = llama4_topk_reference(logits, 2)
    assert ids.tolist() == [[0, 1], [0, 1], [1, 2]]
    assert weights[0].tolist() == [0.0, 0.0] and weights[1].tolist() == [1.0, 1.0]
    weights, ids = llama4_topk_reference(logits, 1)  # top-1 takes its own path (argmax)
    assert ids.tolist() == [[0], [0], [1]]
    assert weights[:, 0].tolist() == [0.0, 1.0, torch.sigmoid(torch.tensor(3.0)).item()]


@pytest.mark.parametrize("per_element", [False, True])
def test_softplus_gate_reference_by_hand(per_element):
    torch.manual_seed(0)
    heads, head_dim = 3, 4
    attn = torch.randn(2, heads * head_dim, dtype=torch.bfloat16)
    gate = torch.randn(2, heads * head_dim if per_element else heads, dtype=torch.bfloat16) * 4
    out = softplus_gate_reference(attn, gate, head_dim)
    g = F.softplus(gate.float()).to(torch.bfloat16)
    for t in range(2):
        for h in range(heads):
            for d in range(head_dim):
                c = h * head_dim + d
                expected = attn[t, c] * (g[t, c] if per_element else g[t, h])
                assert out[t, c].item() == expected.item()
