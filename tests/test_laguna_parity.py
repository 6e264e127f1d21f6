"""Laguna in vLLM (this plugin) against transformers' LagunaForCausalLM, fp32 on CPU.

Every configuration runs four prompts, three of them longer than the sliding window, and
checks 32 greedy tokens and the top-5 logprobs (see ``harness.assert_parity``). Each feature
a configuration claims is turned off in transformers alone to show that it changes the
reference there (``FEATURES``), and no scalar the config parser reads is left at the
parser's default in every configuration: a model ignoring either would fail a parity test.
"""

from __future__ import annotations

import functools
import math

import pytest

from checkpoint_edits import edit_config, rewrite_tensors
from harness import (
    FeatureOff,
    assert_feature_changes_reference,
    assert_parity,
    hf_greedy,
    keys_left_at_default,
    prompts_for,
    reference_logprobs,
    vllm_greedy,
)
from vllm_laguna.configs.laguna import parse_laguna_config
from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna

PROMPT_LENGTHS = [5, 23, 40, 70]  # window 16: three prompts exceed it

YARN_NO_ATTENTION_FACTOR = {
    "full_attention": {
        "rope_type": "yarn",
        "rope_theta": 250000.0,
        "factor": 16.0,
        # long enough for both betas to move the (truncated) correction range of 8 rotary dims
        "original_max_position_embeddings": 4096,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "partial_rotary_factor": 0.25,
    },
    "sliding_attention": {"rope_type": "default", "rope_theta": 20000.0, "partial_rotary_factor": 0.5},
    # stray flat key beside the nested dicts, as some released configs have (ignored)
    "original_max_position_embeddings": 64,
}

CONFIGS = {
    # YaRN (attention_factor 1.0) + partial rotary on full layers, window 16, per-head gate,
    # selection bias, routed scale 2.5, dense layer 0 then sparse, Hub layout, norm eps 1e-4
    "xs2-like": dict(),
    # per-element gate, strong router soft-cap, transformers' fused layout
    "per-element-softcap-fused": dict(gating="per-element", router_softcap=0.5, layout="transformers"),
    # YaRN without attention_factor (transformers' 0.1 ln(factor) + 1) and with other betas,
    # partial rotary on both layer types, stray flat rope key, all layers sparse, sliding
    # window everywhere but 0
    "yarn-mscale-all-sparse": dict(
        rope_parameters=YARN_NO_ATTENTION_FACTOR,
        mlp_layer_types=["sparse"] * 4,
        routed_scaling_factor=1.0,
        top_k=3,
        seed=1,
    ),
    # full attention only, plain RoPE, no shared expert, no bias, top-1, tied embeddings,
    # `gating: true` with per-head weights (transformers' reading of `true`)
    "full-default-rope-top1": dict(
        layer_types=["full_attention"] * 4,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 10000.0}},
        shared_expert_intermediate_size=0,
        bias_std=0.0,
        top_k=1,
        tie_word_embeddings=True,
        gating=True,
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


def _full_rope(config: str, **changes) -> dict:
    """The configuration's rope parameters with the full-attention entry changed."""
    rope = dict(LagunaTiny(**CONFIGS[config]).rope_parameters)
    rope["full_attention"] = {**rope["full_attention"], **changes}
    return rope


def _sliding_rope(config: str, **changes) -> dict:
    rope = dict(LagunaTiny(**CONFIGS[config]).rope_parameters)
    rope["sliding_attention"] = {**rope["sliding_attention"], **changes}
    return rope


#: what each configuration claims to cover, and how transformers turns it off
FEATURES = {
    "xs2-like": {
        "yarn": FeatureOff(dict(rope_parameters=_full_rope("xs2-like", rope_type="default"))),
        "partial-rotary": FeatureOff(dict(rope_parameters=_full_rope("xs2-like", partial_rotary_factor=1.0))),
        "sliding-window": FeatureOff(dict(sliding_window=4096)),
        "per-head-gate": FeatureOff(zero=("g_proj",)),
        "selection-bias": FeatureOff(zero=("e_score_correction_bias",)),
        "routed-scaling": FeatureOff(dict(moe_routed_scaling_factor=1.0)),
        "shared-expert": FeatureOff(zero=("shared_experts.down_proj",)),
        "rms-norm-eps": FeatureOff(dict(rms_norm_eps=1e-6)),
    },
    "per-element-softcap-fused": {
        "per-element-gate": FeatureOff(zero=("g_proj",)),
        "router-softcap": FeatureOff(dict(moe_router_logit_softcapping=0.0)),
    },
    "yarn-mscale-all-sparse": {
        "derived-attention-factor": FeatureOff(
            dict(rope_parameters=_full_rope("yarn-mscale-all-sparse", attention_factor=1.0))
        ),
        "yarn-beta-fast": FeatureOff(dict(rope_parameters=_full_rope("yarn-mscale-all-sparse", beta_fast=32.0))),
        "yarn-beta-slow": FeatureOff(dict(rope_parameters=_full_rope("yarn-mscale-all-sparse", beta_slow=1.0))),
        "sliding-partial-rotary": FeatureOff(
            dict(rope_parameters=_sliding_rope("yarn-mscale-all-sparse", partial_rotary_factor=1.0))
        ),
        "top-3": FeatureOff(dict(num_experts_per_tok=2)),
    },
    "full-default-rope-top1": {
        "per-head-gate-from-true": FeatureOff(zero=("g_proj",)),
    },
    "interleaved-16-experts": {
        "attention-bias": FeatureOff(dict(attention_bias=False)),
        "sliding-window-8": FeatureOff(dict(sliding_window=4096)),
    },
}

#: config keys every configuration leaves at the parser's default, and why that is safe
DEFAULT_EVERYWHERE = {
    "gating_types": "transformers has no per-layer gates: test_laguna_config_keys (its own reference)",
    "swa_attention_sink_enabled": "transformers has no sinks: test_laguna_config_keys (its own reference)",
    "moe_router_score_func": "transformers has only sigmoid: test_laguna_config_keys (mlx-lm's scores as reference)",
    "hidden_act": "only silu is accepted",
    "moe_apply_router_weight_on_input": "only false is accepted",
    "norm_topk_prob": "only true is accepted",
    "moe_router_use_sigmoid": "only true is accepted",
    "qkv_bias": "only false is accepted",
    "use_bidirectional_attention": "only false is accepted",
    "mlp_only_layers": "the older dense-layer schedule, only checked against mlp_layer_types (test_laguna_config)",
    "decoder_sparse_step": "the older dense-layer schedule, only checked against mlp_layer_types (test_laguna_config)",
    "partial_rotary_factor": "top-level fallback of the rope dicts (test_laguna_config)",
    "rope_theta": "top-level fallback of the rope dicts (test_laguna_config)",
    "rope_parameters.original_max_position_embeddings": "a stray flat key, ignored as transformers does",
    "rope_parameters.sliding_attention.rope_type": "default RoPE is the type sliding layers use",
}


@pytest.fixture(scope="module")
def prompts():
    return prompts_for(512, PROMPT_LENGTHS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One checkpoint per configuration, built on first use."""
    return functools.cache(lambda name: build_laguna(tmp_path_factory.mktemp(name) / "ckpt", **CONFIGS[name]))


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    """transformers' logprobs on the longest prompt (past the window), per configuration."""
    return functools.cache(lambda name: reference_logprobs(checkpoint(name), prompts[-1:]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, checkpoint, prompts):
    ckpt = checkpoint(name)
    assert_parity(hf_greedy(ckpt, prompts), vllm_greedy(ckpt, prompts))


@pytest.mark.parametrize(
    ("name", "feature"), [(name, feature) for name, features in FEATURES.items() for feature in features]
)
def test_feature_changes_the_reference(name, feature, checkpoint, reference, prompts):
    """transformers alone: with the feature off, its top-5 logprobs move by more than 10x
    the parity bound, so the parity test of this configuration cannot pass without it."""
    assert_feature_changes_reference(checkpoint(name), prompts[-1:], reference(name), FEATURES[name][feature])


def test_configurations_set_every_scalar_the_parser_reads():
    configs = [LagunaTiny(**options).config() for options in CONFIGS.values()]
    assert keys_left_at_default(parse_laguna_config, configs) == sorted(DEFAULT_EVERYWHERE)


def test_gating_true_is_resolved_from_g_proj_shape(checkpoint, prompts, tmp_path):
    """`gating: true` with per-element g_proj weights runs as the per-element gate.

    transformers reads `true` as per-head, so the reference is the same weights with
    `gating: "per-element"`.
    """
    reference = checkpoint("per-element-softcap-fused")
    ambiguous = build_laguna(tmp_path / "ambiguous", **CONFIGS["per-element-softcap-fused"])
    edit_config(ambiguous, gating=True)
    assert_parity(hf_greedy(reference, prompts[2:]), vllm_greedy(ambiguous, prompts[2:]))


def test_gating_false_has_no_gate(tmp_path, prompts):
    """`gating: false`: no g_proj, attention output straight into o_proj. transformers has no
    gate-less Laguna, so the reference is a per-head checkpoint whose gate is the constant
    softplus(0) = ln 2 and whose o_proj is divided by ln 2: the same function."""
    reference = build_laguna(tmp_path / "reference", seed=5)
    no_gate = build_laguna(tmp_path / "no-gate", seed=5)
    rewrite_tensors(no_gate, lambda t: {n: v for n, v in t.items() if ".g_proj." not in n})
    edit_config(no_gate, gating=False)

    def constant_gate(tensors):
        for name in tensors:
            if ".g_proj." in name:
                tensors[name] = tensors[name] * 0
            elif name.endswith("self_attn.o_proj.weight"):
                tensors[name] = tensors[name] / math.log(2)
        return tensors

    rewrite_tensors(reference, constant_gate)
    assert_parity(hf_greedy(reference, prompts[2:]), vllm_greedy(no_gate, prompts[2:]))


def test_batch_equals_each_prompt_alone(checkpoint, prompts):
    ckpt = checkpoint("xs2-like")
    batched = vllm_greedy(ckpt, prompts)
    alone = vllm_greedy(ckpt, prompts, max_num_seqs=1)  # one prompt at a time, same engine
    assert_parity(alone, batched)
