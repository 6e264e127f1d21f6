"""A broken Laguna checkpoint fails when vLLM loads it, naming the field or tensor."""

from __future__ import annotations

import pytest

from checkpoint_edits import edit_config, rewrite_tensors
from harness import vllm_greedy
from vllm_laguna.tiny.laguna import build_laguna


def _load(ckpt):
    vllm_greedy(ckpt, [[40, 41, 42]], max_new_tokens=1)


@pytest.fixture
def ckpt(tmp_path):
    return build_laguna(tmp_path / "ckpt")


def test_heads_not_divisible_by_kv_heads(ckpt):
    edit_config(ckpt, num_attention_heads_per_layer=[4, 8, 5, 8])
    with pytest.raises(Exception, match=r"num_attention_heads_per_layer\[2\].*multiple of num_key_value_heads=2"):
        _load(ckpt)


def test_list_length_mismatch(ckpt):
    edit_config(ckpt, mlp_layer_types=["dense", "sparse", "sparse"])
    with pytest.raises(Exception, match=r"mlp_layer_types"):
        _load(ckpt)


def test_router_weight_on_input_is_rejected(ckpt):
    edit_config(ckpt, moe_apply_router_weight_on_input=True)
    with pytest.raises(Exception, match=r"moe_apply_router_weight_on_input"):
        _load(ckpt)


def test_missing_expert_tensor(ckpt):
    rewrite_tensors(ckpt, lambda t: {n: v for n, v in t.items() if n != "model.layers.2.mlp.experts.5.up_proj.weight"})
    with pytest.raises(Exception, match=r"missing tensors: model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight"):
        _load(ckpt)


def test_missing_qkv_shard(ckpt):
    rewrite_tensors(ckpt, lambda t: {n: v for n, v in t.items() if n != "model.layers.1.self_attn.v_proj.weight"})
    with pytest.raises(Exception, match=r"model\.layers\.1\.self_attn\.v_proj\.weight"):
        _load(ckpt)


def _add_tensor(ckpt, name):
    def add(tensors):
        if "model.layers.0.self_attn.q_proj.weight" in tensors:
            tensors[name] = tensors["model.layers.0.self_attn.q_proj.weight"][:, :1].clone()
        return tensors

    rewrite_tensors(ckpt, add)


def test_unexpected_bias(ckpt):
    """vLLM's AutoWeightsLoader would drop a stray `.bias` silently; we refuse it."""
    _add_tensor(ckpt, "model.layers.0.self_attn.q_proj.bias")
    with pytest.raises(Exception, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        _load(ckpt)


def test_unexpected_tensor(ckpt):
    _add_tensor(ckpt, "model.layers.0.mlp.extra_proj.weight")
    with pytest.raises(Exception, match=r"model\.layers\.0\.mlp\.extra_proj"):
        _load(ckpt)


def test_g_proj_shape_contradicting_gating(ckpt):
    edit_config(ckpt, gating="per-element")  # weights are per-head
    with pytest.raises(Exception, match=r"g_proj\.weight has 4 rows; config `gating`"):
        _load(ckpt)
