"""LFM2 in vLLM (this plugin) against transformers' Lfm2ForCausalLM, fp32 on CPU.

Every configuration runs prompts of 1 and 2 tokens (shorter than the conv state), one
shorter and two longer than a KV-cache block (128 tokens on CPU), all in one batch, and
checks 32 greedy tokens and the top-5 logprobs (``harness.assert_parity``). Each feature a
configuration claims is turned off in transformers alone to show that it changes the
reference there (``FEATURES``), and no scalar the config parser reads is left at the
parser's default in every configuration.
"""

from __future__ import annotations

import functools

import pytest
import torch

from harness import (
    BF16,
    FeatureOff,
    Greedy,
    assert_feature_changes_reference,
    assert_parity,
    hf_greedy,
    keys_left_at_default,
    low_precision_gaps,
    prompts_for,
    reference_logprobs,
    shutdown,
    start_engine,
    vllm_run,
)
from vllm_laguna.configs.lfm2 import parse_lfm2_config
from vllm_laguna.tiny.lfm2 import Lfm2Tiny, build_lfm2

PROMPT_LENGTHS = [1, 2, 20, 150, 300]

CONFIGS = {
    # transformers-v5 config (no conv_dim/block_dim/block_ff_dim), no conv bias,
    # block_ffn_dim_multiplier 1.0, kernel 3, tied embeddings, norm eps 1e-4, theta 2.5e5
    "v5": dict(),
    # LiquidAI's older Hub config form (full_attn_idxs, block_ff_dim, conv_dim, block_dim,
    # tie_embedding, rope_theta) with conv_bias on in_proj, conv and out_proj, an untied LM
    # head and no feed-forward width adjustment; run with prefix caching off
    # (mamba_cache_mode "none": one state slot per request, the others run vLLM's default
    # "align")
    "hub-conv-bias": dict(
        config_form="hub", conv_bias=True, tie_word_embeddings=False, block_auto_adjust_ff_dim=False, seed=1
    ),
    # block_ffn_dim_multiplier 1.5 (ff 128 -> 192), kernel 4, an explicit head_dim larger
    # than hidden/heads, two KV heads, attention first, untied LM head
    "multiplier-k4-untied": dict(
        block_ffn_dim_multiplier=1.5,
        conv_L_cache=4,
        head_dim=64,
        num_kv_heads=2,
        layer_types=["full_attention", "conv", "conv", "full_attention", "conv", "conv"],
        tie_word_embeddings=False,
        seed=2,
    ),
}

#: what each configuration claims to cover, and how transformers turns it off
FEATURES = {
    "v5": {
        "short-conv": FeatureOff(zero=("conv.conv.weight",)),
        "norm-eps": FeatureOff(dict(norm_eps=1e-5)),
        "rope-theta": FeatureOff(dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    },
    "hub-conv-bias": {
        "conv-bias": FeatureOff(zero=("in_proj.bias", "conv.conv.bias", "out_proj.bias")),
        "rope-theta": FeatureOff(dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    },
    "multiplier-k4-untied": {
        "short-conv-k4": FeatureOff(zero=("conv.conv.weight",)),
    },
}

#: config keys every configuration leaves at the parser's default, and why that is safe
DEFAULT_EVERYWHERE = {
    "block_dim": "must equal hidden_size; transformers ignores it",
    "conv_dim": "must equal hidden_size; transformers ignores it",
    "conv_dim_out": "must equal hidden_size; transformers ignores it",
    "num_heads": "must equal num_attention_heads; transformers ignores it",
    "block_norm_eps": "must equal norm_eps; transformers ignores it",
    "block_use_swiglu": "only true is accepted",
    "use_pos_enc": "only true is accepted",
    "block_ff_dim": "equals intermediate_size in Hub configs (which wins: test_lfm2_config)",
    "rope_parameters.rope_type": "LFM2 uses default RoPE",
    "rope_scaling": "older name of rope_parameters (test_lfm2_config)",
}

ENGINE_OPTIONS = {"hub-conv-bias": dict(enable_prefix_caching=False)}


@pytest.fixture(scope="module")
def prompts():
    return prompts_for(512, PROMPT_LENGTHS, seed=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One checkpoint per configuration, built on first use."""
    return functools.cache(lambda name: build_lfm2(tmp_path_factory.mktemp(name) / "ckpt", **CONFIGS[name]))


@pytest.fixture(scope="module")
def reference(checkpoint, prompts):
    """transformers' logprobs on the longest prompt, per configuration."""
    return functools.cache(lambda name: reference_logprobs(checkpoint(name), prompts[-1:]))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, checkpoint, prompts):
    ckpt = checkpoint(name)
    actual, _ = vllm_run(ckpt, prompts, **ENGINE_OPTIONS.get(name, {}))
    assert_parity(hf_greedy(ckpt, prompts), actual)


@pytest.mark.parametrize(
    ("name", "feature"), [(name, feature) for name, features in FEATURES.items() for feature in features]
)
def test_feature_changes_the_reference(name, feature, checkpoint, reference, prompts):
    """transformers alone, on the longest prompt: with the feature off, its top-5 logprobs
    move by more than 10x the parity bound, so the parity test cannot pass without it."""
    assert_feature_changes_reference(checkpoint(name), prompts[-1:], reference(name), FEATURES[name][feature])


def test_configurations_set_every_scalar_the_parser_reads():
    configs = [Lfm2Tiny(**options).config() for options in CONFIGS.values()]
    assert keys_left_at_default(parse_lfm2_config, configs) == sorted(DEFAULT_EVERYWHERE)
    assert {c.get("config_form", "v5") for c in CONFIGS.values()} == {"v5", "hub"}
    assert min(PROMPT_LENGTHS) < min(Lfm2Tiny(**c).conv_L_cache for c in CONFIGS.values()) - 1
    assert max(PROMPT_LENGTHS) > 2 * 128  # past two KV-cache blocks


def test_conv_state_in_another_dtype_than_the_model(checkpoint, prompts, monkeypatch):
    """``mamba_cache_dtype="bfloat16"`` under an fp32 model: the conv state is allocated in
    bf16; the first token of a prompt prefilled in one step (shorter than a KV block: vLLM's
    default prefix caching prefills block by block, and later blocks read the state) matches
    transformers to the fp32 bound; the whole run, which reads the rounded state, is within
    the bf16 bounds of exact arithmetic (``harness.BF16``). Also: vLLM's profile run (the start-up memory profile on GPUs, the compile
    warm-up on CPU) reaches the conv without any attention metadata, the one case
    ``short_conv.step_metadata`` lets through; real steps always bring it."""
    from vllm import SamplingParams

    from vllm_laguna.model_executor.layers import short_conv

    seen = []
    step_metadata = short_conv.step_metadata

    def recording(layer_name):
        metadata = step_metadata(layer_name)
        seen.append(metadata is not None)
        return metadata

    ckpt = checkpoint("v5")
    monkeypatch.setattr(short_conv, "step_metadata", recording)
    llm = start_engine(ckpt, mamba_cache_dtype="bfloat16")
    try:
        state_dtypes = llm.apply_model(
            lambda model: {layer.conv.kv_cache[0].dtype for layer in model.model.layers if layer.is_conv}
        )[0]
        seen.clear()
        llm.collective_rpc(lambda worker: worker.model_runner.profile_run())
        profile_run, seen[:] = list(seen), []
        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, prompt_logprobs=5, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    finally:
        shutdown(llm)
    assert state_dtypes == {torch.bfloat16}
    assert profile_run and not any(profile_run)  # no metadata in the profile run
    assert seen and all(seen)  # and always in real steps
    actual = [Greedy.from_output(o) for o in outputs]
    expected = hf_greedy(ckpt, prompts)
    one_step = [i for i, p in enumerate(prompts) if len(p) < 128]
    first_token = [[Greedy(run[i].tokens[:1], run[i].top5[:1]) for i in one_step] for run in (expected, actual)]
    assert_parity(*first_token, min_tokens=1)
    print(low_precision_gaps(ckpt, prompts, actual).assert_within(BF16))
