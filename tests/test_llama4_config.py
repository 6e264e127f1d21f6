"""Llama 4 config parsing: the forms transformers resolves, and clear errors for the rest.

Unit tests of :func:`parse_llama4_config` run on raw configs (``SimpleNamespace`` of a
``config.json``, as written) and on transformers' own config objects; two engine tests
check the errors a user meets at load (chunk size vs KV block size, missing tensors).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import Llama4Config, Llama4TextConfig

from harness import assert_parity, hf_greedy, prompts_for, vllm_greedy
from vllm_laguna.configs import ConfigError
from vllm_laguna.configs.llama4 import check_chunk_fits_kv_blocks, parse_llama4_config
from vllm_laguna.model_executor.checkpoint import CheckpointError
from vllm_laguna.model_executor.layers.llama4_attention import attention_temperature
from vllm_laguna.tiny.llama4 import Llama4Tiny, build_llama4


def raw_config(**overrides) -> dict:
    """A tiny text ``config.json`` as written on disk (Hub form: rope_scaling + rope_theta)."""
    cfg = Llama4Tiny().text_config()
    cfg.update(overrides)
    return cfg


def parse_raw(**overrides):
    return parse_llama4_config(SimpleNamespace(**raw_config(**overrides)))


LAYOUT_FORMS = {
    "scout-empty-no-rope-list": dict(
        no_rope_layers=[], no_rope_layer_interval=4, interleave_moe_layer_step=1
    ),
    "interval-2-step-2": dict(no_rope_layers=[], no_rope_layer_interval=2, interleave_moe_layer_step=2),
    "explicit-lists": dict(no_rope_layers=[1, 1, 0, 1], moe_layers=[0, 2]),
    "explicit-layer-types": dict(
        no_rope_layers=[1, 0, 1, 0],
        layer_types=["full_attention", "full_attention", "chunked_attention", "full_attention"],
    ),
}


@pytest.mark.parametrize("name", list(LAYOUT_FORMS))
def test_layer_layout_resolves_as_transformers(name):
    """RoPE/NoPE, chunked/global and MoE/dense per layer, from every form a config takes,
    equal transformers' own resolution (``Llama4TextConfig.__post_init__``)."""
    raw = raw_config(**LAYOUT_FORMS[name])
    hf = Llama4TextConfig(**raw)
    for arch in (parse_llama4_config(SimpleNamespace(**raw)), parse_llama4_config(hf)):
        assert arch.uses_rope == tuple(bool(v) for v in hf.no_rope_layers)
        assert arch.chunked == tuple(t == "chunked_attention" for t in hf.layer_types)
        assert arch.is_moe == tuple(i in hf.moe_layers for i in range(hf.num_hidden_layers))


def test_rope_from_hub_and_transformers_forms_agree():
    raw = raw_config()
    from_hub = parse_llama4_config(SimpleNamespace(**raw)).rope
    from_hf = parse_llama4_config(Llama4TextConfig(**raw)).rope  # rope_parameters (v5)
    assert from_hub == from_hf
    assert from_hub["rope_type"] == "llama3" and from_hub["rope_theta"] == raw["rope_theta"] == 1e6
    assert from_hub["low_freq_factor"] == 1.0 and from_hub["original_max_position_embeddings"] == 256


def test_multimodal_config_reads_text_config():
    raw = raw_config(no_rope_layers=[1, 1, 0, 1])
    config = Llama4Config(text_config=raw, vision_config={"hidden_size": 32, "num_hidden_layers": 1})
    arch = parse_llama4_config(config)
    assert arch.uses_rope == (True, True, False, True)
    assert arch.num_experts == raw["num_local_experts"] and arch.intermediate_size_mlp == 96


def test_temperature_tuning_is_an_int_or_bool_flag():
    """Hub configs wrote ``attn_temperature_tuning: 4``; transformers reads it by truthiness."""
    assert parse_raw(attn_temperature_tuning=4).temperature_tuning
    assert not parse_raw(attn_temperature_tuning=0).temperature_tuning
    assert not parse_raw(no_rope_layers=[1, 1, 1, 1]).temperature_tuning  # no NoPE layer to tune


def test_attention_temperature_values():
    """1 up to position floor_scale - 2, then 1 + attn_scale * ln(1 + floor((pos + 1) / floor_scale))."""
    positions = torch.tensor([0, 14, 15, 16, 46, 47, 8190, 8191])
    got = attention_temperature(positions, floor_scale=16.0, attn_scale=0.1).squeeze(-1)
    floors = [0, 0, 1, 1, 2, 3, 511, 512]
    want = torch.tensor([1.0 + 0.1 * math.log(1 + f) for f in floors])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.dtype == torch.float32


BAD_FIELDS = {
    "no_rope_layers": (dict(no_rope_layers=[1, 0]), "a list of num_hidden_layers=4 entries"),
    "no_rope_layers[1]": (dict(no_rope_layers=[1, 2, 0, 1]), "one of [0, 1]"),
    "no_rope_layer_interval": (dict(no_rope_layers=[], no_rope_layer_interval=0), "a positive integer"),
    "layer_types[0]": (dict(layer_types=["sliding_attention"] + ["full_attention"] * 3), "one of"),
    "attention_chunk_size": (dict(attention_chunk_size=None), "a positive integer"),
    "interleave_moe_layer_step": (dict(interleave_moe_layer_step=0), "a positive integer"),
    "moe_layers": (dict(moe_layers=[1, 4]), "layer indices in [0, num_hidden_layers=4)"),
    "num_experts_per_tok": (dict(num_experts_per_tok=9), "at most num_local_experts=8"),
    "floor_scale": (dict(floor_scale=0), "a number > 0"),
    "attn_scale": (dict(attn_scale=-1.0), "a number >= 0"),
    "hidden_act": (dict(hidden_act="gelu"), '"silu"'),
    "num_key_value_heads": (dict(num_key_value_heads=3), "a divisor of num_attention_heads=4"),
    "head_dim": (dict(head_dim=33), "a positive even integer"),
    "rope_scaling.rope_type": (
        dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        "'default' or 'llama3'",
    ),
    "rope_scaling.low_freq_factor": (
        dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}),
        "a positive number",
    ),
    "intermediate_size_mlp": (dict(intermediate_size_mlp=None), "a positive integer"),
}


@pytest.mark.parametrize("field", list(BAD_FIELDS))
def test_config_error_names_field_and_expected_value(field):
    overrides, expected = BAD_FIELDS[field]
    with pytest.raises(ConfigError) as err:
        parse_raw(**overrides)
    assert f"`{field}`" in str(err.value) and expected in str(err.value)


def test_multimodal_errors_name_the_text_config_field():
    raw = raw_config(no_rope_layers=[1, 0])
    config = SimpleNamespace(text_config=SimpleNamespace(**raw), tie_word_embeddings=False)
    with pytest.raises(ConfigError, match=r"`text_config\.no_rope_layers`"):
        parse_llama4_config(config)


def test_chunk_must_be_a_multiple_of_the_block_size():
    arch = parse_raw(attention_chunk_size=192)
    check_chunk_fits_kv_blocks(arch, 64)
    check_chunk_fits_kv_blocks(arch, 16)
    expected = r"`attention_chunk_size`: expected a multiple of the KV-cache block size, 128"
    with pytest.raises(ConfigError, match=expected):
        check_chunk_fits_kv_blocks(arch, 128)
    # no chunked layer: the chunk size is never used
    check_chunk_fits_kv_blocks(parse_raw(attention_chunk_size=192, layer_types=["full_attention"] * 4), 128)


def test_chunk_below_the_cpu_block_size_fails_at_load_and_runs_with_smaller_blocks(tmp_path):
    """CPU blocks are 128 tokens: chunk 64 is refused at load with the field named, and runs,
    equal to transformers, once the block size divides it."""
    ckpt = build_llama4(tmp_path / "chunk64", attention_chunk_size=64, seed=4)
    prompts = prompts_for(512, [90], seed=4)
    with pytest.raises(ConfigError, match="attention_chunk_size"):
        vllm_greedy(ckpt, prompts, max_new_tokens=1)
    assert_parity(hf_greedy(ckpt, prompts), vllm_greedy(ckpt, prompts, block_size=64))


def test_missing_expert_tensor_is_named_at_load(tmp_path):
    ckpt = build_llama4(tmp_path / "incomplete")
    from safetensors.torch import load_file, save_file

    for shard in ckpt.glob("*.safetensors"):
        tensors = load_file(shard)
        if "model.layers.3.feed_forward.experts.down_proj" in tensors:
            del tensors["model.layers.3.feed_forward.experts.down_proj"]
            save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.feed_forward\.experts\.down_proj"):
        vllm_greedy(ckpt, prompts_for(512, [4]), max_new_tokens=1)
