"""Laguna config keys transformers 5.19 does not implement, run for real:
``swa_attention_sink_enabled`` (per-head attention sinks on sliding layers),
``gating_types`` (per-layer gate kinds) and ``moe_router_score_func`` (the router's score).

The reference is transformers' own ``LagunaForCausalLM`` given what it lacks, from the
checkpoint: each sliding layer's ``self_attn.sink``, applied by an eager attention written
here from vLLM's definition of a sink (a per-head logit in every query's softmax
denominator), each layer's own gate kind (``gate_per_head`` and ``g_proj`` are per-layer
attributes of transformers' attention), and a router whose score function is mlx-lm's
(:func:`mlx_router_forward`). fp32, greedy tokens identical, top-5 logprobs close,
prompts longer than the window.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from checkpoint_edits import edit_config, rewrite_tensors
from harness import (
    FeatureOff,
    assert_feature_changes_reference,
    assert_parity,
    hf_greedy,
    prompts_for,
    reference_logprobs,
    vllm_greedy,
)
from vllm_laguna.tiny.laguna import build_laguna

pytestmark = pytest.mark.slow

PROMPT_LENGTHS = [5, 23, 40, 70]  # window 16
MIXED_GATES = ["per-element", "per-head", "per-element", "per-head"]


def attention_with_sink(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention; ``module.sink`` ``[H]``, where present, joins the softmax as one more
    logit per head whose probability is dropped: ``p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))``.
    q ``[B, H, Q, D]``, k/v ``[B, KV, K, D]``."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)
    value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    sink = getattr(module, "sink", None)
    if sink is not None:
        column = sink.to(scores.dtype).reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, column], dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
    if sink is not None:
        probs = probs[..., :-1]
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class LagunaReference:
    """``model_cls`` for ``harness.hf_greedy``: transformers' Laguna plus the checkpoint's sinks
    and per-layer gates (see the module docstring)."""

    @staticmethod
    def from_pretrained(path: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM

        config = json.loads((Path(path) / "config.json").read_text())
        tensors = {}
        for shard in sorted(Path(path).glob("*.safetensors")):
            tensors.update(load_file(shard))
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", ignore_mismatched_sizes=True
        )
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            g_proj = tensors[f"model.layers.{i}.self_attn.g_proj.weight"]
            attn.g_proj = torch.nn.Linear(g_proj.shape[1], g_proj.shape[0], bias=False, dtype=dtype)
            attn.g_proj.weight.data.copy_(g_proj)
            attn.gate_per_head = g_proj.shape[0] == attn.num_heads
            sink = tensors.get(f"model.layers.{i}.self_attn.sink")
            if sink is not None:
                assert config["swa_attention_sink_enabled"] and config["layer_types"][i] == "sliding_attention"
                attn.sink = torch.nn.Parameter(sink.to(dtype), requires_grad=False)
        return model


#: mlx-lm's Laguna scores (``mlx_lm/models/laguna.py``, "Add support for sqrtsoftplus moe
#: routing activation for future Laguna releases"): ``mx.sigmoid`` or
#: ``mx.sqrt(nn.softplus(.))``, softplus being ``logaddexp(x, 0)``; other values raise.
MLX_SCORES = {
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: torch.sqrt(torch.logaddexp(logits, torch.zeros_like(logits))),
}


def mlx_routing(logits, bias, softcap, score_func, top_k):
    """mlx-lm's Laguna routing on fp32 logits ``[T, E]``: soft-cap, score, top-k of the
    biased scores, the chosen unbiased scores renormalised (the block scales them after).
    Returns (weights, ids)."""
    if softcap > 0.0:
        logits = torch.tanh(logits / softcap) * softcap
    scores = MLX_SCORES[score_func](logits)
    ids = torch.topk(scores + bias.to(scores.dtype), top_k, dim=-1).indices
    weights = scores.gather(-1, ids)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def mlx_router_forward(self, hidden_states):
    """transformers 5.19's ``LagunaTopKRouter.forward`` with :func:`mlx_routing` in place of
    its fixed sigmoid; the score function is the config's ``moe_router_score_func``."""
    hidden_states = hidden_states.reshape(-1, self.hidden_dim)
    router_logits = torch.nn.functional.linear(hidden_states, self.weight).float()
    weights, ids = mlx_routing(
        router_logits, self.e_score_correction_bias, self.router_logit_softcapping, self.score_func, self.top_k
    )
    return router_logits, weights.to(hidden_states.dtype), ids


@pytest.fixture
def reference_router(monkeypatch):
    from transformers.models.laguna import modeling_laguna

    router = modeling_laguna.LagunaTopKRouter
    init = router.__init__

    def init_with_score_func(self, config):
        init(self, config)
        self.score_func = getattr(config, "moe_router_score_func", "sigmoid")

    monkeypatch.setattr(router, "__init__", init_with_score_func)
    monkeypatch.setattr(router, "forward", mlx_router_forward)


@pytest.fixture
def reference_attention(monkeypatch):
    from transformers.models.laguna import modeling_laguna

    monkeypatch.setattr(modeling_laguna, "eager_attention_forward", attention_with_sink)


@pytest.fixture(scope="module")
def prompts():
    return prompts_for(512, PROMPT_LENGTHS)


def test_attention_sinks_match_the_reference(tmp_path, prompts, reference_attention):
    ckpt = build_laguna(tmp_path / "sinks", swa_attention_sink=True)
    expected = hf_greedy(ckpt, prompts, model_cls=LagunaReference)
    assert_parity(expected, vllm_greedy(ckpt, prompts))
    # the sinks matter: without them the reference decodes otherwise
    rewrite_tensors(ckpt, lambda t: {n: v for n, v in t.items() if not n.endswith(".sink")})
    assert [g.tokens for g in hf_greedy(ckpt, prompts, model_cls=LagunaReference)] != [g.tokens for g in expected]


def test_per_layer_gate_kinds_match_the_reference(tmp_path, prompts, reference_attention):
    ckpt = build_laguna(tmp_path / "mixed", gating=True, gating_types=MIXED_GATES)
    assert_parity(hf_greedy(ckpt, prompts, model_cls=LagunaReference), vllm_greedy(ckpt, prompts))


#: sqrt(softplus) checkpoints: selection bias (std 0.1), soft-cap, routed scaling all set
SQRTSOFTPLUS = {
    "hub-softcap-1": dict(router_score_func="sqrtsoftplus", router_softcap=1.0, seed=4),
    "fused-top3-softcap-2": dict(
        router_score_func="sqrtsoftplus",
        router_softcap=2.0,
        top_k=3,
        routed_scaling_factor=1.7,
        bias_std=0.2,
        layout="transformers",
        seed=5,
    ),
}


@pytest.mark.parametrize("name", list(SQRTSOFTPLUS))
def test_sqrtsoftplus_router_matches_the_reference(name, tmp_path, prompts, reference_router):
    ckpt = build_laguna(tmp_path / name, **SQRTSOFTPLUS[name])
    assert json.loads((ckpt / "config.json").read_text())["moe_router_score_func"] == "sqrtsoftplus"
    assert_parity(hf_greedy(ckpt, prompts), vllm_greedy(ckpt, prompts))
    # the score function matters: the same weights under sigmoid give another output
    baseline = reference_logprobs(ckpt, prompts[-1:])
    assert_feature_changes_reference(ckpt, prompts[-1:], baseline, FeatureOff(dict(moe_router_score_func="sigmoid")))


@pytest.mark.parametrize("name", list(SQRTSOFTPLUS))
def test_sqrtsoftplus_checkpoints_pick_other_experts_than_sigmoid(name):
    """Each checkpoint's bias and soft-cap make the two scores choose different experts for
    many tokens (without a bias both rank experts alike), not only weigh them differently."""
    from vllm_laguna.tiny.laguna import LagunaTiny

    spec = LagunaTiny(**SQRTSOFTPLUS[name])
    weights = spec.hub_state_dict()
    torch.manual_seed(0)
    x = torch.randn(4096, spec.hidden_size)  # RMS-normed router inputs
    for layer, kind in enumerate(spec.mlp_layer_types):
        if kind != "sparse":
            continue
        logits = x @ weights[f"model.layers.{layer}.mlp.gate.weight"].float().T
        bias = weights[f"model.layers.{layer}.mlp.experts.e_score_correction_bias"]
        picks = {
            f: mlx_routing(logits, bias, spec.router_softcap, f, spec.top_k)[1].sort(-1).values for f in MLX_SCORES
        }
        differ = (picks["sigmoid"] != picks["sqrtsoftplus"]).any(-1).float().mean().item()
        assert differ > 0.05, f"layer {layer}: only {differ:.1%} of tokens route otherwise"


def test_unknown_router_score_function_is_refused(tmp_path):
    ckpt = build_laguna(tmp_path / "ckpt", router_score_func="softmax")
    expected = r'`moe_router_score_func`: expected "sigmoid" or "sqrtsoftplus" \(got .softmax.\)'
    with pytest.raises(Exception, match=expected):
        _load(ckpt)


def test_a_key_nobody_knows_loads_with_one_warning_naming_it(tmp_path, caplog, monkeypatch):
    from vllm_laguna.configs import keys

    monkeypatch.setattr(keys, "_warned", set())
    ckpt = build_laguna(tmp_path / "ckpt", config_overrides={"moe_expert_temperature": 0.7})
    with caplog.at_level(logging.WARNING, logger=keys.__name__):
        _load(ckpt)
    warnings = [r.getMessage() for r in caplog.records if r.name == keys.__name__]
    assert len(warnings) == 1 and "`moe_expert_temperature`" in warnings[0], warnings


def _load(ckpt):
    vllm_greedy(ckpt, [[40, 41, 42]], max_new_tokens=1)


def test_gate_weight_contradicting_gating_types(tmp_path):
    ckpt = build_laguna(tmp_path / "ckpt", gating=True, gating_types=MIXED_GATES)
    edit_config(ckpt, gating_types=["per-element", "per-element", "per-element", "per-head"])
    with pytest.raises(Exception, match=r"layers\.1\.self_attn\.g_proj\.weight has 8 rows; config `gating_types\[1\]`"):
        _load(ckpt)


def test_missing_sink(tmp_path):
    ckpt = build_laguna(tmp_path / "ckpt", swa_attention_sink=True)
    rewrite_tensors(ckpt, lambda t: {n: v for n, v in t.items() if n != "model.layers.2.self_attn.sink"})
    with pytest.raises(Exception, match=r"missing tensors: model\.layers\.2\.self_attn\.sink"):
        _load(ckpt)


def test_sink_without_the_config_key(tmp_path):
    ckpt = build_laguna(tmp_path / "ckpt", swa_attention_sink=True)
    edit_config(ckpt, swa_attention_sink_enabled=False)
    with pytest.raises(Exception, match=r"model\.layers\.1\.self_attn\.sink"):
        _load(ckpt)
