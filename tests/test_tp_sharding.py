"""How layers split over tensor-parallel ranks, built as one rank of a fake TP group (no
processes): the per-rank shapes, the shard a rank loads, and the errors for sizes that do
not split. The engine-level TP=2 runs (``test_*_tp*``, ``test_tensor_parallel_2``) check
the numbers; these check the rules, cheaply, for sizes those runs do not use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness import KV_CACHE_BYTES
from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna


@pytest.fixture
def tp_rank(monkeypatch):
    """Makes this process rank ``rank`` of a TP group of ``size`` for the layers built after."""
    from vllm.distributed import parallel_state

    def become(size: int, rank: int) -> None:
        monkeypatch.setattr(parallel_state, "_TP", SimpleNamespace(world_size=size, rank_in_group=rank))

    return become


@pytest.fixture(scope="module")
def laguna_model_config(tmp_path_factory):
    import vllm_laguna
    from vllm.config import ModelConfig

    vllm_laguna.register()
    return ModelConfig(model=str(build_laguna(tmp_path_factory.mktemp("laguna") / "ckpt")), dtype="float32")


def _laguna_arch(**options):
    from vllm_laguna.configs.laguna import parse_laguna_config

    return parse_laguna_config(SimpleNamespace(**LagunaTiny(**options).config()))


@pytest.fixture
def vllm_config(laguna_model_config):
    from vllm.config import CacheConfig, VllmConfig, set_current_vllm_config

    cache_config = CacheConfig(kv_cache_memory_bytes=KV_CACHE_BYTES)
    with set_current_vllm_config(VllmConfig(model_config=laguna_model_config, cache_config=cache_config)):
        yield


@pytest.mark.parametrize("rank", [0, 1])
def test_gating_true_resolves_per_element_on_each_rank(tp_rank, vllm_config, rank):
    """`gating: true` under TP=2: the layer starts per-head (4 of 8 gates on this rank); a
    per-element checkpoint tensor (8 heads x 32 rows) rebuilds g_proj per element, and the
    rank loads its own half of the rows, heads [4 rank, 4 rank + 4)."""
    from vllm_laguna.model_executor.layers.gated_attention import GatedAttention

    tp_rank(2, rank)
    layer = GatedAttention(_laguna_arch(gating=True), 1, None, None, prefix="model.layers.1.self_attn")
    assert layer.g_proj.weight.shape == (4, 64) and layer.heads.num_heads == 4
    full = torch.randn(8 * 32, 64)
    layer.g_proj.weight.weight_loader(layer.g_proj.weight, full)
    assert torch.equal(layer.g_proj.weight, full[128 * rank : 128 * (rank + 1)])
    per_head = GatedAttention(_laguna_arch(gating=True), 1, None, None, prefix="model.layers.1.self_attn.b")
    gates = torch.randn(8, 64)
    per_head.g_proj.weight.weight_loader(per_head.g_proj.weight, gates)
    assert torch.equal(per_head.g_proj.weight, gates[4 * rank : 4 * (rank + 1)])


def test_gate_rows_fitting_neither_form_name_the_layer(tp_rank, vllm_config):
    from vllm_laguna.model_executor.checkpoint import CheckpointError
    from vllm_laguna.model_executor.layers.gated_attention import GatedAttention

    tp_rank(2, 0)
    layer = GatedAttention(_laguna_arch(gating=True), 1, None, None, prefix="model.layers.1.self_attn")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.g_proj\.weight has 100 rows"):
        layer.g_proj.weight.weight_loader(layer.g_proj.weight, torch.randn(100, 64))


@pytest.mark.parametrize(
    ("size", "heads", "kv_heads", "message"),
    [
        (3, 8, 2, r"num_attention_heads_per_layer\[1\]=8 is not divisible by tensor_parallel_size=3"),
        (4, 8, 6, r"num_key_value_heads=6 and tensor_parallel_size=4: one must divide the other"),
    ],
)
def test_heads_that_do_not_split_are_refused(tp_rank, size, heads, kv_heads, message):
    from vllm_laguna.model_executor.layers.attention_heads import RankHeads

    tp_rank(size, 0)
    with pytest.raises(ValueError, match=message):
        RankHeads.for_this_rank(heads, kv_heads, 32, heads_field="num_attention_heads_per_layer[1]")


@pytest.mark.parametrize(("size", "kv_heads", "local_kv"), [(2, 1, 1), (2, 4, 2), (4, 2, 1)])
def test_kv_heads_split_or_replicate(tp_rank, size, kv_heads, local_kv):
    from vllm_laguna.model_executor.layers.attention_heads import RankHeads

    tp_rank(size, 0)
    assert RankHeads.for_this_rank(8, kv_heads, 32) == RankHeads(8 // size, local_kv, 32)


def test_more_ranks_than_experts_are_refused(tp_rank, vllm_config):
    from vllm_laguna.model_executor.layers.llama4_moe import Llama4MoE
    from vllm_laguna.model_executor.models.laguna import LagunaSparseMoeBlock

    tp_rank(16, 0)
    with pytest.raises(ValueError, match="tensor_parallel_size=16 exceeds num_experts=8"):
        LagunaSparseMoeBlock(_laguna_arch(), None, prefix="model.layers.1.mlp")
    from vllm_laguna.configs.llama4 import parse_llama4_config
    from vllm_laguna.tiny.llama4 import Llama4Tiny

    arch = parse_llama4_config(SimpleNamespace(**Llama4Tiny().config()))
    with pytest.raises(ValueError, match="tensor_parallel_size=16 exceeds"):
        Llama4MoE(arch, None, prefix="model.layers.1.feed_forward")
