"""LFM2 config resolution: both config forms read as transformers reads them, the
feed-forward width rule against transformers' own ``Lfm2MLP``, and clear errors."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import Lfm2Config
from transformers.models.lfm2.modeling_lfm2 import Lfm2MLP

from vllm_laguna.configs.errors import ConfigError
from vllm_laguna.configs.lfm2 import parse_lfm2_config
from vllm_laguna.tiny.lfm2 import Lfm2Tiny


def _transformers(raw: dict) -> Lfm2Config:
    return Lfm2Config.from_dict(dict(raw))


def _raw(raw: dict) -> SimpleNamespace:
    """The JSON fields as attributes, untouched by transformers."""
    return SimpleNamespace(**raw)


@pytest.mark.parametrize("spec", [Lfm2Tiny(), Lfm2Tiny(conv_bias=True, tie_word_embeddings=False, conv_L_cache=4)])
def test_both_config_forms_resolve_alike(spec):
    """The v5 form and the older Hub form of one model resolve to the same architecture,
    whether transformers parsed the config first (as in vLLM) or not."""
    v5 = spec.config()
    hub = Lfm2Tiny(**{**spec.__dict__, "config_form": "hub"}).config()
    assert "conv_dim" not in v5 and "block_dim" not in v5 and "layer_types" not in hub
    arch, *others = (parse_lfm2_config(c) for c in (_transformers(v5), _transformers(hub), _raw(v5), _raw(hub)))
    assert all(other == arch for other in others)
    assert arch.layer_types == tuple(spec.layer_types)
    assert arch.ff_dim == spec.ff_dim
    assert (arch.conv_bias, arch.tie_word_embeddings, arch.conv_kernel) == (
        spec.conv_bias,
        spec.tie_word_embeddings,
        spec.conv_L_cache,
    )
    assert arch.rope == {"rope_type": "default", "rope_theta": spec.rope_theta}


FF_CASES = {
    "multiplier-1": dict(intermediate_size=12288, block_ffn_dim_multiplier=1.0, block_multiple_of=256),
    "lfm2-350m": dict(intermediate_size=6656, block_ffn_dim_multiplier=1.0, block_multiple_of=256),
    "multiplier-1.5": dict(intermediate_size=192, block_ffn_dim_multiplier=1.5, block_multiple_of=32),
    "multiplier-0.7": dict(intermediate_size=1000, block_ffn_dim_multiplier=0.7, block_multiple_of=64),
    # null multiplier (older configs; transformers 5.19's strict dataclass refuses it at
    # init, its Lfm2MLP still handles it): int(2I/3), not rounded to block_multiple_of
    "no-multiplier": dict(intermediate_size=200, block_ffn_dim_multiplier=None, block_multiple_of=32),
    "no-auto-adjust": dict(intermediate_size=200, block_auto_adjust_ff_dim=False, block_ffn_dim_multiplier=1.5),
}


@pytest.mark.parametrize("case", list(FF_CASES))
def test_ff_dim_matches_transformers(case):
    config = Lfm2Config(hidden_size=64, num_attention_heads=2, num_key_value_heads=1)
    for key, value in FF_CASES[case].items():
        object.__setattr__(config, key, value)  # bypass the strict dataclass's validation
    assert parse_lfm2_config(config).ff_dim == Lfm2MLP(config).w1.out_features


def test_block_ff_dim_wins_over_intermediate_size():
    raw = {**Lfm2Tiny(config_form="hub").config(), "block_ff_dim": 384, "intermediate_size": 96}
    assert parse_lfm2_config(_raw(raw)).ff_dim == parse_lfm2_config(_transformers(raw)).ff_dim == 256


@pytest.mark.parametrize("idxs", [None, [], [0, 5], [3]])
def test_full_attn_idxs_as_transformers_reads_them(idxs):
    raw = {k: v for k, v in Lfm2Tiny(config_form="hub").config().items() if k != "full_attn_idxs"}
    if idxs is not None:
        raw["full_attn_idxs"] = idxs
    assert parse_lfm2_config(_raw(raw)).layer_types == tuple(_transformers(raw).layer_types)


def test_tie_embedding_and_head_dim():
    raw = {**Lfm2Tiny(config_form="hub").config(), "tie_embedding": False, "head_dim": 48}
    arch = parse_lfm2_config(_raw(raw))
    assert not arch.tie_word_embeddings and not _transformers(raw).tie_word_embeddings
    assert arch.head_dim == 48
    assert parse_lfm2_config(_raw(Lfm2Tiny().config())).head_dim == 32  # hidden 64 / 2 heads


BAD = {
    "conv_dim": (dict(conv_dim=128), r"`conv_dim`: expected hidden_size=64"),
    "block_dim": (dict(block_dim=32), r"`block_dim`: expected hidden_size=64"),
    "layer_type": (dict(layer_types=["conv"] * 5 + ["sliding_attention"]), r"`layer_types\[5\]`: expected one of"),
    "layer_count": (dict(layer_types=["conv"] * 5), r"`layer_types`: expected a list of num_hidden_layers=6"),
    "attn_idx": (dict(layer_types=None, full_attn_idxs=[2, 6]), r"`full_attn_idxs\[1\]`: expected a layer index"),
    "multiplier": (dict(block_ffn_dim_multiplier=-1.0), r"`block_ffn_dim_multiplier`: expected a positive number"),
    "multiple_of": (dict(block_multiple_of=0), r"`block_multiple_of`: expected a positive integer"),
    "kernel": (dict(conv_L_cache=1), r"`conv_L_cache`: expected an integer >= 2"),
    "kv_heads": (dict(num_key_value_heads=3, num_attention_heads=4), r"`num_key_value_heads`: expected a divisor"),
    "head_dim": (dict(head_dim=33), r"`head_dim`: expected a positive even integer"),
    "norm_eps": (dict(norm_eps=-1e-5), r"`norm_eps`: expected a positive number"),
    "conv_bias": (dict(conv_bias="yes"), r"`conv_bias`: expected true or false"),
    "rope_theta": (dict(rope_parameters={"rope_type": "default", "rope_theta": 0}), r"rope_theta`: expected a"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_config_names_the_field(case):
    changes, message = BAD[case]
    raw = {**Lfm2Tiny().config(), **changes}
    with pytest.raises(ConfigError, match=message):
        parse_lfm2_config(_raw(raw))


def test_rope_forms_read_as_transformers_reads_them():
    """``rope_parameters`` (v5), ``rope_theta`` (Hub form) and the older name
    ``rope_scaling`` give the theta transformers uses; absent all, its default 1e6."""
    v5 = Lfm2Tiny().config()
    legacy = {k: v for k, v in v5.items() if k != "rope_parameters"} | {"rope_scaling": v5["rope_parameters"]}
    hub = Lfm2Tiny(config_form="hub").config()
    bare = {k: v for k, v in hub.items() if k != "rope_theta"}
    for raw in (v5, legacy, hub, bare):
        want = _transformers(raw).rope_parameters["rope_theta"]
        assert parse_lfm2_config(_raw(raw)).rope == parse_lfm2_config(_transformers(raw)).rope
        assert parse_lfm2_config(_raw(raw)).rope == {"rope_type": "default", "rope_theta": want}
    assert parse_lfm2_config(_raw(bare)).rope["rope_theta"] == 1e6 != Lfm2Tiny().rope_theta
