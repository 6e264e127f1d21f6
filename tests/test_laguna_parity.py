"""Laguna in vLLM (this plugin) against transformers' LagunaForCausalLM, fp32 on CPU.

Every configuration runs four prompts, two of them longer than the sliding window, and
checks 32 greedy tokens and the top-5 logprobs (see ``harness.assert_parity``).
"""

from __future__ import annotations

import json
import shutil

import pytest

from harness import assert_parity, hf_greedy, prompts_for, vllm_greedy
from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna

PROMPT_LENGTHS = [5, 23, 40, 70]  # window 16: three prompts exceed it

YARN_NO_ATTENTION_FACTOR = {
    "full_attention": {
        "rope_type": "yarn",
        "rope_theta": 500000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "partial_rotary_factor": 0.25,
    },
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    # stray flat key beside the nested dicts, as some released configs have
    "original_max_position_embeddings": 4096,
}

CONFIGS = {
    # YaRN (attention_factor 1.0) + partial rotary on full layers, window 16, per-head gate,
    # selection bias, routed scale 2.5, dense layer 0 then sparse, Hub layout
    "xs2-like": dict(),
    # per-element gate, strong router soft-cap, transformers' fused layout
    "per-element-softcap-fused": dict(gating="per-element", router_softcap=0.5, layout="transformers"),
    # YaRN without attention_factor (transformers' 0.1 ln(factor) + 1), partial rotary on
    # both layer types, stray flat rope key, all layers sparse, sliding window everywhere but 0
    "yarn-mscale-all-sparse": dict(
        rope_parameters=YARN_NO_ATTENTION_FACTOR,
        mlp_layer_types=["sparse"] * 4,
        routed_scaling_factor=1.0,
        top_k=3,
        seed=1,
    ),
    # full attention only, plain RoPE, no shared expert, no bias, top-1, tied embeddings
    "full-default-rope-top1": dict(
        layer_types=["full_attention"] * 4,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        shared_expert_intermediate_size=0,
        bias_std=0.0,
        top_k=1,
        tie_word_embeddings=True,
        seed=2,
    ),
    # dense and sparse interleaved, many heads per layer, 16 experts, attention biases
    "interleaved-16-experts": dict(
        attention_bias=True,
        mlp_layer_types=["sparse", "dense", "sparse", "dense"],
        heads_per_layer=[2, 4, 6, 8],
        num_experts=16,
        top_k=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        sliding_window=8,
        seed=3,
    ),
}


@pytest.fixture(scope="module")
def prompts():
    return prompts_for(512, PROMPT_LENGTHS)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path, prompts):
    ckpt = build_laguna(tmp_path / name, **CONFIGS[name])
    assert_parity(hf_greedy(ckpt, prompts), vllm_greedy(ckpt, prompts))


def test_gating_true_is_resolved_from_g_proj_shape(tmp_path, prompts):
    """`gating: true` with per-element g_proj weights runs as the per-element gate.

    transformers reads `true` as per-head, so the reference is the same weights with
    `gating: "per-element"`.
    """
    reference = build_laguna(tmp_path / "explicit", gating="per-element")
    ambiguous = tmp_path / "ambiguous"
    shutil.copytree(reference, ambiguous)
    config = json.loads((ambiguous / "config.json").read_text())
    config["gating"] = True
    (ambiguous / "config.json").write_text(json.dumps(config))
    assert_parity(hf_greedy(reference, prompts), vllm_greedy(ambiguous, prompts))


def test_selection_bias_changes_the_result(tmp_path, prompts):
    """The correction bias must matter: without it the same weights give other logprobs."""
    with_bias = vllm_greedy(build_laguna(tmp_path / "bias"), prompts[:2], max_new_tokens=4)
    without = vllm_greedy(build_laguna(tmp_path / "nobias", bias_std=0.0), prompts[:2], max_new_tokens=4)
    diffs = [
        abs(a.top5[0][t] - b.top5[0][t])
        for a, b in zip(with_bias, without)
        for t in a.top5[0].keys() & b.top5[0].keys()
    ]
    assert max(diffs) > 1e-3


def test_batch_equals_each_prompt_alone(tmp_path, prompts):
    ckpt = build_laguna(tmp_path / "batch")
    batched = vllm_greedy(ckpt, prompts)
    alone = [vllm_greedy(ckpt, [p])[0] for p in prompts]
    assert_parity(alone, batched, atol=1e-4)


def test_spec_defaults_cover_every_feature():
    """The default tiny spec is the feature-complete one the other tests vary."""
    spec = LagunaTiny()
    assert set(spec.layer_types) == {"full_attention", "sliding_attention"}
    assert spec.rope_parameters["full_attention"]["rope_type"] == "yarn"
    assert spec.rope_parameters["full_attention"]["partial_rotary_factor"] < 1
    assert set(spec.mlp_layer_types) == {"dense", "sparse"}
    assert len(set(spec.heads_per_layer)) > 1
    assert spec.routed_scaling_factor != 1.0 and spec.bias_std > 0
    assert spec.sliding_window < max(PROMPT_LENGTHS)
