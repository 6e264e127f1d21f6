"""LFM2 in vLLM (this plugin) against transformers' Lfm2ForCausalLM, fp32 on CPU.

Every configuration runs prompts of 1 and 2 tokens (shorter than the conv state), one
shorter and two longer than a KV-cache block (128 tokens on CPU), all in one batch, and
checks 32 greedy tokens and the top-5 logprobs (``harness.assert_parity``).
"""

from __future__ import annotations

import pytest

from harness import assert_parity, hf_greedy, prompts_for, vllm_greedy
from vllm_laguna.tiny.lfm2 import Lfm2Tiny, build_lfm2

PROMPT_LENGTHS = [1, 2, 20, 150, 300]

CONFIGS = {
    # transformers-v5 config (no conv_dim/block_dim/block_ff_dim), no conv bias,
    # block_ffn_dim_multiplier 1.0, kernel 3, tied embeddings
    "v5": dict(),
    # LiquidAI's older Hub config form (full_attn_idxs, block_ff_dim, conv_dim, block_dim,
    # tie_embedding, rope_theta) with conv_bias on in_proj, conv and out_proj; run with
    # prefix caching off (mamba_cache_mode "none": one state slot per request, the others
    # run vLLM's default "align")
    "hub-conv-bias": dict(config_form="hub", conv_bias=True, seed=1),
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


@pytest.fixture(scope="module")
def prompts():
    return prompts_for(512, PROMPT_LENGTHS, seed=1)


ENGINE_OPTIONS = {"hub-conv-bias": dict(enable_prefix_caching=False)}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_with_transformers(name, tmp_path, prompts):
    ckpt = build_lfm2(tmp_path / name, **CONFIGS[name])
    assert_parity(hf_greedy(ckpt, prompts), vllm_greedy(ckpt, prompts, **ENGINE_OPTIONS.get(name, {})))


def test_configs_cover_the_issue():
    """The configurations above are the ones the issue asks for."""
    specs = {name: Lfm2Tiny(**options) for name, options in CONFIGS.items()}
    assert {s.config_form for s in specs.values()} == {"v5", "hub"}
    assert {s.conv_bias for s in specs.values()} == {True, False}
    assert any(s.block_ffn_dim_multiplier not in (None, 1.0) for s in specs.values())
    assert min(PROMPT_LENGTHS) < min(s.conv_L_cache for s in specs.values()) - 1 < 128 < max(PROMPT_LENGTHS)
