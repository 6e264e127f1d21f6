"""Laguna config resolution: RoPE against transformers, and clear errors for bad configs."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import LagunaConfig
from transformers.models.laguna import modeling_laguna

from vllm_laguna.configs import ConfigError
from vllm_laguna.configs.laguna import parse_laguna_config

XS2_FULL = {
    "rope_type": "yarn",
    "rope_theta": 500000.0,
    "factor": 32.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 64.0,
    "beta_slow": 1.0,
    "attention_factor": 1.0,
    "partial_rotary_factor": 0.5,
}
SLIDING = {"rope_type": "default", "rope_theta": 10000.0}


def _without(d, key):
    return {k: v for k, v in d.items() if k != key}


def laguna_config(**overrides) -> LagunaConfig:
    kwargs = dict(
        vocab_size=256,
        hidden_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        layer_types=["full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse"],
        rope_parameters={"full_attention": dict(XS2_FULL), "sliding_attention": dict(SLIDING)},
        max_position_embeddings=131072,
        num_experts=8,
        num_experts_per_tok=2,
    )
    kwargs.update(overrides)
    return LagunaConfig(**kwargs)


def _bad(config, **attrs):
    for key, value in attrs.items():
        object.__setattr__(config, key, value)  # bypass transformers' own validation
    return config


ROPE_CASES = {
    "xs2-factor32": {"full_attention": XS2_FULL, "sliding_attention": SLIDING},
    "xs2-factor64": {"full_attention": {**XS2_FULL, "factor": 64.0}, "sliding_attention": SLIDING},
    # no attention_factor: transformers scales cos/sin by 0.1 ln(factor) + 1
    "factor32-no-attention-factor": {
        "full_attention": _without(XS2_FULL, "attention_factor"),
        "sliding_attention": SLIDING,
    },
    "factor64-no-attention-factor": {
        "full_attention": {**_without(XS2_FULL, "attention_factor"), "factor": 64.0},
        "sliding_attention": {**SLIDING, "partial_rotary_factor": 0.25},
    },
    # no attention_factor but mscale and mscale_all_dim: their ratio of YaRN's mscales
    "mscale-ratio": {
        "full_attention": {**_without(XS2_FULL, "attention_factor"), "mscale": 1.0, "mscale_all_dim": 0.5},
        "sliding_attention": SLIDING,
    },
    # a null factor is derived: max_position_embeddings / original_max_position_embeddings
    "factor-derived": {"full_attention": {**XS2_FULL, "factor": None}, "sliding_attention": SLIDING},
    # entries without theta or partial rotary take the config's top-level values
    "top-level-theta-and-partial": (
        {"full_attention": XS2_FULL, "sliding_attention": {"rope_type": "default"}},
        dict(rope_theta=20000.0, partial_rotary_factor=0.25),
    ),
}


@pytest.mark.parametrize("case", list(ROPE_CASES))
def test_rope_matches_transformers(case, default_vllm_config):
    """vLLM's get_rope, fed our resolved parameters, rotates q/k exactly as transformers,
    YaRN's attention_factor (given or derived) included. Pins vLLM 0.32's behaviour."""
    from vllm.model_executor.layers.rotary_embedding import get_rope

    rope, top_level = ROPE_CASES[case] if isinstance(ROPE_CASES[case], tuple) else (ROPE_CASES[case], {})
    config = laguna_config(rope_parameters=copy.deepcopy(rope), **top_level)
    arch = parse_laguna_config(config)
    hf_rope = modeling_laguna.LagunaRotaryEmbedding(config)
    positions = torch.tensor([0, 1, 7, 100, 4095, 4096, 20000, 131071])
    gen = torch.Generator().manual_seed(0)
    for layer, layer_type in enumerate(config.layer_types):
        q = torch.randn(len(positions), 4, 128, generator=gen)
        k = torch.randn(len(positions), 2, 128, generator=gen)
        cos, sin = hf_rope(q, positions[None], layer_type)
        want_q, want_k = modeling_laguna.apply_rotary_pos_emb(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin
        )
        rope = get_rope(128, max_position=arch.max_position_embeddings, rope_parameters=arch.rope(layer),
                        dtype=torch.float32)
        got_q, got_k = rope.forward_native(positions, q.reshape(len(positions), -1), k.reshape(len(positions), -1))
        torch.testing.assert_close(got_q.view_as(q), want_q[0].transpose(0, 1), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got_k.view_as(k), want_k[0].transpose(0, 1), atol=2e-5, rtol=1e-5)


def test_missing_attention_factor_scales_rotation():
    """Guard that the case above is not vacuous: without the key the scale is 1.35, not 1."""
    arch = parse_laguna_config(laguna_config(rope_parameters=copy.deepcopy(ROPE_CASES["factor32-no-attention-factor"])))
    assert "attention_factor" not in arch.rope(0)
    hf_rope = modeling_laguna.LagunaRotaryEmbedding(laguna_config(
        rope_parameters=copy.deepcopy(ROPE_CASES["factor32-no-attention-factor"])))
    assert hf_rope.full_attention_attention_scaling == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)


def test_nested_rope_tolerates_stray_flat_keys_and_fills_defaults():
    params = {
        "full_attention": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0},
        "sliding_attention": {"rope_theta": 1e4},
        "original_max_position_embeddings": 4096,  # stray flat key: ignored, as transformers does
        "rope_theta": 123.0,
    }
    # transformers' validator would reject the YaRN entry without original_max_position_embeddings;
    # we fill it the way its standardize_rope_params does.
    arch = parse_laguna_config(_bad(laguna_config(max_position_embeddings=8192), rope_parameters=params))
    full, sliding = arch.rope(0), arch.rope(1)
    assert full["rope_theta"] == 1e6 and full["factor"] == 8.0
    assert full["original_max_position_embeddings"] == 8192  # transformers: max_position_embeddings
    assert (full["beta_fast"], full["beta_slow"]) == (32, 1)
    assert sliding == {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 1.0}


def test_rope_scaling_is_read_when_rope_parameters_is_absent():
    """Older configs name the dict ``rope_scaling``; transformers moves it to
    ``rope_parameters``, and a raw config reads the same either way."""
    from vllm_laguna.tiny.laguna import LagunaTiny

    raw = LagunaTiny().config()
    legacy = {k: v for k, v in raw.items() if k != "rope_parameters"} | {"rope_scaling": raw["rope_parameters"]}
    want = parse_laguna_config(SimpleNamespace(**raw)).rope_by_layer_type
    assert parse_laguna_config(SimpleNamespace(**legacy)).rope_by_layer_type == want
    assert parse_laguna_config(LagunaConfig.from_dict(copy.deepcopy(legacy))).rope_by_layer_type == want
    assert want["full_attention"]["rope_type"] == "yarn"


def test_flat_rope_applies_to_every_layer_type():
    arch = parse_laguna_config(laguna_config(rope_parameters={"rope_type": "default", "rope_theta": 5e5,
                                                              "partial_rotary_factor": 0.5}))
    assert arch.rope(0) == arch.rope(1) == {"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.5}


def test_windows_only_on_sliding_layers():
    arch = parse_laguna_config(laguna_config(sliding_window=64))
    assert arch.window(0) is None and arch.window(1) == 64


@pytest.mark.parametrize(
    "gating, expected", [(True, "from-weights"), ("per-head", "per-head"), ("per-element", "per-element"), (False, "none")]
)
def test_gating_values(gating, expected):
    assert parse_laguna_config(laguna_config(gating=gating)).gating == expected


@pytest.mark.parametrize(
    "gating, gating_types, expected",
    [
        (True, None, ("from-weights", "from-weights")),
        (True, ["per-element", "per-head"], ("per-element", "per-head")),
        ("per-head", ["per-head", "per-head"], ("per-head", "per-head")),
        (False, None, ("none", "none")),
    ],
)
def test_gating_types_decide_each_layer(gating, gating_types, expected):
    arch = parse_laguna_config(laguna_config(gating=gating, gating_types=gating_types))
    assert (arch.gate(0), arch.gate(1)) == expected
    assert arch.gate_field(1) == ("gating" if gating_types is None else "gating_types[1]")


@pytest.mark.parametrize("enabled", [False, True])
def test_attention_sinks_on_sliding_layers_only(enabled):
    arch = parse_laguna_config(laguna_config(swa_attention_sink_enabled=enabled))
    assert (arch.has_sink(0), arch.has_sink(1)) == (False, enabled)  # layer 0 full, 1 sliding


@pytest.mark.parametrize("value", [None, "sigmoid", "sqrtsoftplus"])
def test_router_score_function(value):
    """Absent: sigmoid (every released checkpoint); the drafter's config (a Laguna config of
    its own) reads the key as well."""
    from vllm_laguna.configs.laguna_dflash import parse_laguna_dflash_config
    from vllm_laguna.tiny.laguna import LagunaDFlashTiny, LagunaTiny

    overrides = {} if value is None else {"moe_router_score_func": value}
    assert parse_laguna_config(laguna_config(**overrides)).router_score_func == (value or "sigmoid")
    target = LagunaTiny()
    drafter = LagunaConfig(**LagunaDFlashTiny().config(target), **overrides)
    arch = parse_laguna_dflash_config(drafter, target.num_layers, target.vocab_size, target.hidden_size)
    assert arch.layers.router_score_func == (value or "sigmoid")
    with pytest.raises(ConfigError, match="moe_router_score_func"):
        bad = LagunaConfig(**LagunaDFlashTiny().config(target), moe_router_score_func="sqrt_softplus")
        parse_laguna_dflash_config(bad, target.num_layers, target.vocab_size, target.hidden_size)


BAD_CONFIGS = {
    "layer_types": dict(layer_types=["full_attention"] * 3),
    "mlp_layer_types": dict(mlp_layer_types=["dense"]),
    "num_attention_heads_per_layer": dict(num_attention_heads_per_layer=[4, 4, 4]),
    "num_attention_heads_per_layer[1]": dict(num_attention_heads_per_layer=[4, 3]),
    "layer_types[1]": dict(layer_types=["full_attention", "local"]),
    "mlp_layer_types[0]": dict(mlp_layer_types=["moe", "sparse"]),
    "gating": dict(gating="per-channel"),
    "moe_apply_router_weight_on_input": dict(moe_apply_router_weight_on_input=True),
    "sliding_window": dict(sliding_window=0),
    "rope_parameters.sliding_attention": dict(rope_parameters={"full_attention": dict(XS2_FULL)}),
    "rope_parameters.full_attention.partial_rotary_factor": dict(
        rope_parameters={"full_attention": {**XS2_FULL, "partial_rotary_factor": 1.5}, "sliding_attention": SLIDING}
    ),
    "num_experts_per_tok": dict(num_experts_per_tok=9),
    "hidden_act": dict(hidden_act="gelu"),
    "gating_types": dict(gating_types=["per-head"]),
    "gating_types[1]": dict(gating_types=["per-head", "per-channel"]),
    "swa_attention_sink_enabled": dict(swa_attention_sink_enabled="yes"),
    "moe_router_score_func": dict(moe_router_score_func="softmax"),
    "norm_topk_prob": dict(norm_topk_prob=False),
    "moe_router_use_sigmoid": dict(moe_router_use_sigmoid=False),
    "qkv_bias": dict(qkv_bias=True),
    "use_bidirectional_attention": dict(use_bidirectional_attention=True),
    "mlp_only_layers": dict(mlp_only_layers=[0, 1]),
    "decoder_sparse_step": dict(decoder_sparse_step=2, mlp_layer_types=["sparse", "sparse"]),
    "swa_rope_parameters": dict(rope_parameters=dict(XS2_FULL), swa_rope_parameters="default"),
}


@pytest.mark.parametrize("gating", ["per_head", "per_element"])
def test_gate_kinds_take_the_underscore_spelling(gating):
    """Some S-2.1 configs write ``per_head``; llama.cpp accepts it too."""
    arch = parse_laguna_config(laguna_config(gating=gating, gating_types=[gating, gating]))
    assert arch.gating == gating.replace("_", "-") and arch.gate(1) == gating.replace("_", "-")


def test_legacy_flat_rope_takes_the_sliding_layers_rope_from_swa_rope_parameters():
    """Older configs: a flat YaRN rope_parameters (with the top-level partial rotary factor) for
    the full layers, the sliding layers' rope in swa_rope_parameters (vLLM in-tree reads it so)."""
    full = _without(XS2_FULL, "partial_rotary_factor")
    config = _bad(laguna_config(), rope_parameters=full, partial_rotary_factor=0.5, swa_rope_parameters=dict(SLIDING))
    arch = parse_laguna_config(config)
    assert arch.rope(0)["rope_type"] == "yarn" and arch.rope(0)["partial_rotary_factor"] == 0.5
    assert arch.rope(1) == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    swa = {**SLIDING, "partial_rotary_factor": 1.0}
    assert parse_laguna_config(_bad(config, swa_rope_parameters=swa)).rope(1)["partial_rotary_factor"] == 1.0


@pytest.mark.parametrize(
    "schedule, mlp_layer_types",
    [
        (dict(mlp_only_layers=[0], decoder_sparse_step=1), ["dense", "sparse", "sparse", "sparse"]),
        (dict(mlp_only_layers=[0, 1]), ["dense", "dense", "sparse", "sparse"]),
        (dict(mlp_only_layers=[], decoder_sparse_step=2), ["dense", "sparse", "dense", "sparse"]),
    ],
)
def test_older_dense_layer_schedule_must_agree_with_mlp_layer_types(schedule, mlp_layer_types):
    layers = dict(num_hidden_layers=4, layer_types=["full_attention"] * 4)
    arch = parse_laguna_config(laguna_config(**layers, **schedule, mlp_layer_types=mlp_layer_types))
    assert arch.mlp_layer_types == tuple(mlp_layer_types)
    # transformers' fill-in for a config without mlp_layer_types (one leading dense layer)
    filled = laguna_config(**layers, **schedule, mlp_layer_types=None)
    if filled.mlp_layer_types != mlp_layer_types:
        with pytest.raises(ConfigError, match="add it"):
            parse_laguna_config(filled)


def test_no_experts_makes_every_layer_dense():
    """The DFlash drafters write ``num_experts: 0`` and no mlp_layer_types, which transformers
    fills with sparse layers; vLLM builds experts only when there are some."""
    arch = parse_laguna_config(laguna_config(num_experts=0, mlp_layer_types=None))
    assert arch.mlp_layer_types == ("dense", "dense") and arch.num_experts == 0



@pytest.mark.parametrize(
    "gating, gating_types, field",
    [("per-head", ["per-head", "per-element"], "gating_types[1]"), (False, ["per-head", "per-head"], "gating_types")],
)
def test_gating_types_contradicting_gating(gating, gating_types, field):
    with pytest.raises(ConfigError) as err:
        parse_laguna_config(_bad(laguna_config(), gating=gating, gating_types=gating_types))
    assert err.value.field == field


@pytest.mark.parametrize("field", list(BAD_CONFIGS))
def test_bad_config_names_the_field(field):
    with pytest.raises(ConfigError) as err:
        parse_laguna_config(_bad(laguna_config(), **BAD_CONFIGS[field]))
    assert err.value.field == field
    assert f"`{field}`" in str(err.value) and "expected" in str(err.value)
