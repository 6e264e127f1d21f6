"""Laguna DFlash drafter config: what it reads from the drafter's config.json (as vLLM hands
it over) and the errors for drafters that do not fit their target."""

from __future__ import annotations

import pytest
from transformers import LagunaConfig

from vllm_laguna.configs import ConfigError
from vllm_laguna.configs.laguna import LAYER_TYPES
from vllm_laguna.configs.laguna_dflash import parse_laguna_dflash_config
from vllm_laguna.tiny.laguna import LagunaDFlashTiny, LagunaTiny, build_laguna_dflash

TARGET = LagunaTiny()


def drafter_config(**overrides) -> LagunaConfig:
    """The tiny drafter's config.json loaded as transformers loads it (model_type "laguna")."""
    return LagunaConfig(**(LagunaDFlashTiny().config(TARGET) | overrides))


def parse(config, num_layers=TARGET.num_layers, vocab=TARGET.vocab_size, hidden=TARGET.hidden_size):
    return parse_laguna_dflash_config(config, num_layers, vocab, hidden)


def test_tiny_drafter_config():
    arch = parse(drafter_config())
    assert arch.target_layer_ids == (0, 2)
    assert arch.target_hidden_size == TARGET.hidden_size
    assert arch.mask_token_id == 31
    assert arch.layers.layer_types == ("sliding_attention",) * 2
    assert arch.layers.mlp_layer_types == ("dense",) * 2
    assert arch.layers.gating == "per-head"


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"dflash_config": {"target_layer_ids": [0, 4], "mask_token_id": 31}}, "dflash_config.target_layer_ids"),
        ({"dflash_config": {"target_layer_ids": [], "mask_token_id": 31}}, "dflash_config.target_layer_ids"),
        ({"dflash_config": {"target_layer_ids": [0, 2], "mask_token_id": 512}}, "dflash_config.mask_token_id"),
        ({"eagle_aux_hidden_state_layer_ids": [0, 2]}, "eagle_aux_hidden_state_layer_ids"),
        (
            {
                "layer_types": ["full_attention", "sliding_attention"],
                "rope_parameters": {t: {"rope_type": "default", "rope_theta": 1e4} for t in LAYER_TYPES},
            },
            "layer_types",
        ),
        ({"dflash_config": {"target_layer_ids": [0, 2]}}, "dflash_config.mask_token_id"),
        ({"mlp_layer_types": ["dense", "sparse"]}, "mlp_layer_types"),
        ({"draft_vocab_size": 256}, "draft_vocab_size"),
    ],
)
def test_drafter_that_does_not_fit_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as error:
        parse(drafter_config(**overrides))
    assert error.value.field == field


def test_drafter_for_a_wider_target_names_hidden_size():
    with pytest.raises(ConfigError, match="hidden_size"):
        parse(drafter_config(), hidden=128)


def test_builder_refuses_target_layers_outside_the_target(tmp_path):
    with pytest.raises(ValueError, match=r"target_layer_ids: expected 2 target layer indices in \[0, 4\)"):
        build_laguna_dflash(tmp_path / "d", TARGET, target_layer_ids=[0, 4])
