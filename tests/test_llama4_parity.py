"""Llama 4 text in vLLM (this plugin) against transformers' Llama4ForCausalLM, fp32 on CPU.

Prompts of 5, 40, 150 and 290 tokens: two pass the attention chunk (128, the CPU block
size; 290 + 32 generated tokens crosses two chunk boundaries) and all pass ``floor_scale``
(16 in the tiny model, so attention temperature tuning changes q from position 15 on).
Every configuration checks 32 greedy tokens and the top-5 logprobs (``harness.assert_parity``).
Each feature a configuration claims is turned off in transformers alone to show that it
changes the reference there (``FEATURES``), and no scalar the config parser reads is left at
the parser's default in every configuration.
"""

from __future__ import annotations

import functools

import pytest

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
from vllm_laguna.configs.llama4 import parse_llama4_config
from vllm_laguna.tiny.llama4 import Llama4Tiny, build_llama4

PROMPT_LENGTHS = [5, 40, 150, 290]
PROMPTS = prompts_for(512, PROMPT_LENGTHS)

CONFIGS = {
    # The default tiny model (see Llama4Tiny): top-1 MoE on layers 1 and 3, dense 0 and 2,
    # q/k norm, RoPE/NoPE alternating from `no_rope_layers: []`, chunked attention on the
    # RoPE layers, temperature tuning (attn_scale 0.25) on the NoPE layers, Llama 3 RoPE
    # scaling (theta 1e6), norm eps 1e-4
    "default": dict(),
    # top-2 routing (one row per token and choice), no q/k norm, explicit no_rope_layers,
    # moe_layers and layer_types (layer 1 uses RoPE without a chunk), plain RoPE, no
    # temperature tuning, attention biases, tied embeddings
    "top2": dict(
        top_k=2,
        use_qk_norm=False,
        no_rope_layers=[1, 1, 0, 1],
        moe_layers=[0, 2, 3],
        layer_types=["chunked_attention", "full_attention", "full_attention", "chunked_attention"],
        rope_scaling=None,
        attn_temperature_tuning=False,
        attention_bias=True,
        tie_word_embeddings=True,
        seed=1,
    ),
}

#: what each configuration claims to cover, and how transformers turns it off
FEATURES = {
    "default": {
        "temperature-tuning": FeatureOff(dict(attn_temperature_tuning=False)),
        "attn-scale": FeatureOff(dict(attn_scale=0.1)),
        "floor-scale": FeatureOff(dict(floor_scale=8192)),
        "chunked-attention": FeatureOff(dict(attention_chunk_size=4096)),
        "qk-norm": FeatureOff(dict(use_qk_norm=False)),
        "nope-layers": FeatureOff(dict(no_rope_layers=[1, 1, 1, 1])),
        "llama3-rope-scaling": FeatureOff(dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        "rope-theta": FeatureOff(
            dict(rope_parameters={**Llama4Tiny().rope_scaling, "rope_theta": 500000.0}),
        ),
        "shared-expert": FeatureOff(zero=("shared_expert.down_proj",)),
        "rms-norm-eps": FeatureOff(dict(rms_norm_eps=1e-5)),
    },
    "top2": {
        "top-2": FeatureOff(dict(num_experts_per_tok=1)),
        "attention-bias": FeatureOff(dict(attention_bias=False)),
        # what the layer types would be without the explicit list: chunked on RoPE layers
        "layer-types": FeatureOff(
            dict(layer_types=["chunked_attention", "chunked_attention", "full_attention", "chunked_attention"])
        ),
    },
}

#: config keys every configuration leaves at the parser's default, and why that is safe
DEFAULT_EVERYWHERE = {
    "hidden_act": "only silu is accepted",
    "partial_rotary_factor": "only 1.0 is accepted",
    "nope_layer_interval": "Meta's name for no_rope_layer_interval, only checked against it (test_config_keys)",
    "rope_parameters": "transformers v5's name; the checkpoints write rope_scaling (test_llama4_config)",
    "text_config": "multimodal checkpoints: test_other_checkpoint_layouts_load_the_same_model",
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One checkpoint per configuration, built on first use."""
    return functools.cache(lambda name: build_llama4(tmp_path_factory.mktemp(name) / "ckpt", **CONFIGS[name]))


@pytest.fixture(scope="module")
def reference(checkpoint):
    """transformers' logprobs on the two prompts past the chunk, per configuration."""
    return functools.cache(lambda name: reference_logprobs(checkpoint(name), PROMPTS[2:]))


@pytest.fixture(scope="module")
def default_reference(checkpoint):
    return hf_greedy(checkpoint("default"), PROMPTS)


@pytest.fixture(scope="module")
def default_batched(checkpoint):
    return vllm_greedy(checkpoint("default"), PROMPTS)


def test_parity_default(default_reference, default_batched):
    assert_parity(default_reference, default_batched)


def test_parity_top2(checkpoint):
    ckpt = checkpoint("top2")
    assert_parity(hf_greedy(ckpt, PROMPTS), vllm_greedy(ckpt, PROMPTS))


@pytest.mark.parametrize(
    ("name", "feature"), [(name, feature) for name, features in FEATURES.items() for feature in features]
)
def test_feature_changes_the_reference(name, feature, checkpoint, reference):
    """transformers alone, on the two prompts past the chunk: with the feature off, its
    top-5 logprobs move by more than 10x the parity bound, so the parity test of this
    configuration cannot pass without it."""
    assert_feature_changes_reference(checkpoint(name), PROMPTS[2:], reference(name), FEATURES[name][feature])


def test_configurations_set_every_scalar_the_parser_reads():
    configs = [Llama4Tiny(**options).config() for options in CONFIGS.values()]
    assert keys_left_at_default(parse_llama4_config, configs) == sorted(DEFAULT_EVERYWHERE)


def test_mixed_length_batch_equals_each_prompt_alone(checkpoint, default_batched):
    """``max_num_seqs=1`` runs the prompts one at a time through the same engine."""
    alone = vllm_greedy(checkpoint("default"), PROMPTS, max_num_seqs=1)
    assert_parity(alone, default_batched)


@pytest.mark.parametrize(
    "layout",
    [
        # Llama4ForConditionalGeneration checkpoint: `language_model.` prefix, vision tensors
        dict(layout="multimodal"),
        # per-expert tensors, the layout of quantized checkpoints
        dict(expert_layout="per-expert"),
    ],
    ids=["multimodal", "per-expert"],
)
def test_other_checkpoint_layouts_load_the_same_model(tmp_path, layout, default_reference):
    """Same weights, other layouts on disk: vLLM on them equals transformers on the text layout."""
    ckpt = build_llama4(tmp_path / "ckpt", **layout)
    overrides = {"architectures": ["Llama4ForCausalLM"]} if layout.get("layout") == "multimodal" else None
    assert_parity(default_reference, vllm_greedy(ckpt, PROMPTS, hf_overrides=overrides))


def test_tensor_parallel_2(tmp_path, monkeypatch):
    """TP=2 on the CPU backend, one core per rank: heads, experts' and dense widths split;
    a single KV head (replicated); top-2 rows, reduced once with the shared expert."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = build_llama4(tmp_path / "tp", **{**CONFIGS["top2"], "num_kv_heads": 1})
    prompts = PROMPTS[1:]
    expected = hf_greedy(ckpt, prompts)
    actual = vllm_greedy(ckpt, prompts, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert_parity(expected, actual)
