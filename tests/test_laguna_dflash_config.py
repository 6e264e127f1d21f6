"""Laguna DFlash drafter config: what it reads from the drafter's config.json (as vLLM hands
it over) and the errors for drafters that do not fit their target."""

from __future__ import annotations

import pytest
import torch
from transformers import LagunaConfig

from vllm_laguna.configs import ConfigError
from vllm_laguna.configs.laguna import LAYER_TYPES, parse_laguna_config
from vllm_laguna.configs.laguna_dflash import (
    check_kv_cache_grouping,
    draft_layers_share_a_kv_cache_group,
    parse_laguna_dflash_config,
)
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


# --- KV-cache grouping: every drafter layer in one group -----------------------------------


def vllm_draft_groups(num_full: int, num_sliding: int, num_draft: int, draft_head_dim: int, hybrid: bool) -> int:
    """How many KV-cache groups vLLM's own grouping spreads the drafter's layers over, on the
    specs the CPU runner registers: target layers first (full, then sliding: the order within
    the target does not change the buckets), then the drafter's full-attention layers. The
    target's K/V are 2 heads x 32; a drafter with another head_dim has another spec."""
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    try:  # vLLM 0.33 moved the grouping into kv_cache_planning (the same code)
        from vllm.v1.core.kv_cache_planning import get_kv_cache_groups
    except ImportError:  # vLLM 0.32
        from vllm.v1.core.kv_cache_utils import get_kv_cache_groups

    config = VllmConfig()
    config.cache_config.kv_cache_layout = "LBHNC"  # what the engine core resolves for the CPU backend
    config.scheduler_config.disable_hybrid_kv_cache_manager = not hybrid
    kv = dict(block_size=128, num_kv_heads=2, dtype=torch.float32)
    specs = {}
    for i in range(num_full):
        specs[f"model.layers.{i}.self_attn.attn"] = FullAttentionSpec(head_size=32, **kv)
    for i in range(num_full, num_full + num_sliding):
        specs[f"model.layers.{i}.self_attn.attn"] = SlidingWindowSpec(head_size=32, sliding_window=16, **kv)
    target_layers = len(specs)
    draft = {f"model.layers.{target_layers + i}.self_attn.attn" for i in range(num_draft)}
    for name in draft:
        specs[name] = FullAttentionSpec(head_size=draft_head_dim, **kv)
    return sum(1 for group in get_kv_cache_groups(config, specs) if draft & set(group.layer_names))


@pytest.mark.parametrize("num_full, num_sliding", [(f, s) for f in range(5) for s in range(9) if f + s])
def test_grouping_rule_is_vllms(num_full, num_sliding):
    """The rule agrees with vLLM's grouping for drafters of 1 to 9 layers, with the target's
    K/V shape (head_dim 32: they join its full bucket) or another (64, 16: a bucket of their
    own; larger and smaller pages), and the layer counts that fit are 1..m."""
    for head_dim in (32, 64, 16):
        fits = [vllm_draft_groups(num_full, num_sliding, d, head_dim, hybrid=True) == 1 for d in range(1, 10)]
        assert fits == [
            draft_layers_share_a_kv_cache_group(num_full, num_sliding, d, head_dim == 32) for d in range(1, 10)
        ]
        assert fits == sorted(fits, reverse=True)  # 1..m fit, no more
        assert all(vllm_draft_groups(num_full, num_sliding, d, head_dim, hybrid=False) == 1 for d in range(1, 10))


@pytest.mark.parametrize(
    "num_full, num_sliding, num_draft, joins, fits",
    [
        (2, 4, 2, False, True),  # FACTS.md: runs (its pair had a K/V shape unlike the target's, see next)
        (2, 4, 3, False, False),  # FACTS.md: AssertionError in the worker
        (2, 4, 3, True, True),  # same K/V shape: a bucket of 5 full layers, group size 5
        (1, 3, 2, True, True),  # the tiny pair of the engine tests
        (1, 3, 4, True, False),  # full bucket 5 >= 1.5 x 3: groups of 3
        (10, 30, 10, False, True),  # Laguna-XS.2's pattern (1 full : 3 sliding over 40 layers)
        (10, 30, 11, False, False),
        (10, 30, 34, True, True),
        (10, 30, 35, True, False),
        (4, 0, 9, False, True),  # full attention only: one group
        (1, 3, 1, False, True),  # one layer is always in one group
    ],
)
def test_grouping_rule_cases(num_full, num_sliding, num_draft, joins, fits):
    assert draft_layers_share_a_kv_cache_group(num_full, num_sliding, num_draft, joins) is fits


SIX_LAYER_TARGET = LagunaTiny(
    num_layers=6,
    heads_per_layer=[4] * 6,
    layer_types=["full_attention", "sliding_attention", "sliding_attention"] * 2,
    mlp_layer_types=["dense"] + ["sparse"] * 5,
)


def six_layer_pair(num_layers: int, **drafter_options):
    """The 6-layer target (2 full + 4 sliding, K/V 2 x 32) and a drafter of ``num_layers``."""
    target = parse_laguna_config(LagunaConfig(**SIX_LAYER_TARGET.config()))
    spec = LagunaDFlashTiny(num_layers=num_layers, target_layer_ids=list(range(num_layers)), **drafter_options)
    drafter = parse_laguna_dflash_config(
        LagunaConfig(**spec.config(SIX_LAYER_TARGET)), target.num_layers, target.vocab_size, target.hidden_size
    )
    return drafter, target


def test_drafter_split_over_kv_cache_groups_is_refused_naming_the_counts_that_work():
    drafter, target = six_layer_pair(3, head_dim=64)
    with pytest.raises(ConfigError) as error:
        check_kv_cache_grouping(drafter, target, tensor_parallel_size=1, hybrid_kv_cache_manager=True)
    message = str(error.value)
    assert error.value.field == "num_hidden_layers"
    assert message.startswith("Laguna DFlash drafter config field `num_hidden_layers`: expected 1 to 2 drafter layers")
    assert "(2 full_attention + 4 sliding_attention layers)" in message
    assert "one KV-cache group" in message
    assert "K/V 2 heads x 64 per rank, the target's 2 x 32" in message
    assert "splits over 2 groups" in message
    assert "--disable-hybrid-kv-cache-manager" in message
    assert message.endswith("(got 3)")


@pytest.mark.parametrize(
    "num_layers, options, tensor_parallel_size, hybrid",
    [
        (2, {"head_dim": 64}, 1, True),  # a bucket of 2: the group size
        (3, {}, 1, True),  # the target's K/V shape: joins its full layers, a bucket of 5
        (3, {"num_kv_heads": 4}, 4, True),  # 4 and 2 K/V heads are both 1 per rank on 4 ranks
        (3, {"head_dim": 64}, 1, False),  # --disable-hybrid-kv-cache-manager: one group
    ],
)
def test_drafters_in_one_kv_cache_group_load(num_layers, options, tensor_parallel_size, hybrid):
    drafter, target = six_layer_pair(num_layers, **options)
    check_kv_cache_grouping(drafter, target, tensor_parallel_size, hybrid)


def test_refusal_on_full_bucket_names_the_joined_bucket():
    drafter, target = six_layer_pair(5)
    joined = r"expected 1 to 3 drafter layers .*same K/V shape: 2 heads x 32 per rank\) in a bucket of 7"
    with pytest.raises(ConfigError, match=joined):
        check_kv_cache_grouping(drafter, target, tensor_parallel_size=1, hybrid_kv_cache_manager=True)
