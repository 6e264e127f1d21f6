"""EPLB (vLLM's ``MixtureOfExperts``) for Laguna and Llama 4, checked on the CPU backend.

vLLM 0.32 refuses ``enable_eplb`` off CUDA/ROCm/XPU (``ParallelConfig``: "Expert parallelism
load balancing is only supported on CUDA devices or ROCm devices or XPU devices now"), and
its CPU build maps no expert ids (``base_router.eplb_map_to_physical_and_record`` is the
identity there; on CUDA it is a Triton kernel). So no engine runs EPLB here. These tests
build the models the way vLLM's loader does (``loaded_models``), with ``enable_eplb`` and
``num_redundant_experts`` set after the config's validation, and drive the MoE layers as
vLLM's EPLB does: ``set_eplb_state`` with vLLM's initial maps, the mapping done by
:func:`eplb_map_reference` (the CUDA kernel's rule in torch), and a rebalance that moves
rows of ``model.expert_weights`` the way vLLM's weight exchange does.
"""

from __future__ import annotations

import pytest
import torch

from loaded_models import load_model, process_group  # noqa: F401 (fixture)
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.llama4 import build_llama4

NUM_REDUNDANT = 3
NUM_TOKENS = 64
# the tiny checkpoints' expert count (both builders' default)
NUM_EXPERTS = 8

#: name -> (builder, options, feed-forward attribute, number of MoE layers)
CHECKPOINTS = {
    # Hub layout: per-expert tensors (vLLM's per-expert mapping, also Llama 4's per-expert
    # layout); layer 0 dense
    "laguna-hub": (build_laguna, dict(), "mlp", 3),
    # transformers' layout: fused experts.gate_up_proj / experts.down_proj
    "laguna-fused": (build_laguna, dict(layout="transformers"), "mlp", 3),
    # fused, transposed; top-2 (one row per token and choice); MoE on layers 1 and 3
    "llama4-top2": (build_llama4, dict(top_k=2, use_qk_norm=False, seed=1), "feed_forward", 2),
}


def eplb_map_reference(
    topk_ids, expert_load_view, logical_to_physical_map, logical_replica_count, record_enabled, num_unpadded_tokens=None
):
    """vLLM's CUDA EPLB step (``base_router._eplb_map_and_record_i32_kernel``) in torch: row
    ``t``'s logical expert ``e`` goes to replica ``(t * 2654435769 mod 2**32) mod count[e]``
    of ``e``, and each physical id's load grows by one per row that picks it."""
    ids = topk_ids.long()
    rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
    replica = ((rows * 2654435769) & 0xFFFFFFFF) % logical_replica_count[ids].clamp(min=1)
    physical = logical_to_physical_map[ids, replica]
    if bool(record_enabled):
        counted = physical if num_unpadded_tokens is None else physical[: int(num_unpadded_tokens)]
        expert_load_view.index_add_(0, counted.flatten(), torch.ones_like(counted.flatten(), dtype=expert_load_view.dtype))
    return physical.to(topk_ids.dtype)


def eplb_maps(physical_to_logical: list[int], num_logical: int, num_layers: int):
    """vLLM's per-layer maps for one arrangement (as ``EplbState.add_model`` lays them out):
    ``logical_to_physical`` [L, E, slots] (-1 padded), ``replica_count`` [L, E]."""
    slots = max(physical_to_logical.count(e) for e in range(num_logical))
    l2p = torch.full((num_logical, slots), -1, dtype=torch.long)
    count = torch.zeros(num_logical, dtype=torch.long)
    for p, e in enumerate(physical_to_logical):
        l2p[e, count[e]] = p
        count[e] += 1
    return l2p.expand(num_layers, -1, -1).contiguous(), count.expand(num_layers, -1).contiguous()


def attach_eplb_state(model, physical_to_logical: list[int]):
    """``model.set_eplb_state`` with the maps of ``physical_to_logical``, plus the tensors
    vLLM's ``EplbState`` shares with every layer. Returns the load buffer [L, P]."""
    l2p, count = eplb_maps(physical_to_logical, model.num_logical_experts, model.num_moe_layers)
    load = torch.zeros(model.num_moe_layers, model.num_physical_experts, dtype=torch.int32)
    model.set_eplb_state(load, l2p, count)
    record, unpadded = torch.ones((), dtype=torch.bool), [torch.tensor(NUM_TOKENS, dtype=torch.int32)]
    for layer in model.moe_layers:
        layer.eplb_state.should_record_tensor = record
        layer.eplb_state.num_unpadded_tokens_tensors = unpadded
    return load, l2p, count


def moe_outputs(model, vllm_config, ffn_name: str, x: torch.Tensor) -> list[torch.Tensor]:
    """Each MoE feed-forward block of ``model`` on the same input ``x`` [T, H]."""
    from vllm.forward_context import set_forward_context

    blocks = [getattr(layer, ffn_name) for layer in model.model.layers]
    blocks = [b for b in blocks if getattr(b, "experts", None) in model.moe_layers]
    with torch.no_grad(), set_forward_context(None, vllm_config):
        return [block(x) for block in blocks]


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def models(request, process_group, tmp_path_factory):
    """The checkpoint loaded without EPLB, and with EPLB and NUM_REDUNDANT replicas."""
    build, options, ffn_name, num_moe_layers = CHECKPOINTS[request.param]
    ckpt = build(tmp_path_factory.mktemp(request.param) / "ckpt", **options)
    plain, plain_config = load_model(ckpt)
    eplb, eplb_config = load_model(ckpt, num_redundant_experts=NUM_REDUNDANT)
    x = torch.randn(NUM_TOKENS, plain.model.arch.hidden_size, generator=torch.Generator().manual_seed(0))
    return dict(plain=(plain, plain_config), eplb=(eplb, eplb_config), ffn_name=ffn_name, num_moe_layers=num_moe_layers, x=x)


def test_mixture_of_experts_interface(models):
    from vllm.model_executor.layers.fused_moe import MoERunner
    from vllm.model_executor.models.interfaces import is_mixture_of_experts

    plain, _ = models["plain"]
    eplb, _ = models["eplb"]
    for model, redundant in ((plain, 0), (eplb, NUM_REDUNDANT)):
        assert is_mixture_of_experts(model)
        assert model.num_moe_layers == len(model.moe_layers) == models["num_moe_layers"]
        assert all(isinstance(m, MoERunner) for m in model.moe_layers)
        assert (model.num_logical_experts, model.num_routed_experts) == (NUM_EXPERTS, NUM_EXPERTS)
        assert model.num_redundant_experts == redundant
        assert model.num_physical_experts == model.num_local_physical_experts == NUM_EXPERTS + redundant
        assert (model.num_expert_groups, model.num_shared_experts) == (1, 1)
    # only the EPLB model's routers carry a state for vLLM to fill
    assert all(m.router.eplb_state is None for m in plain.moe_layers)
    assert all(m.router.eplb_state is not None for m in eplb.moe_layers)


def test_set_eplb_state_registers_expert_weights(models):
    eplb, _ = models["eplb"]
    physical = NUM_EXPERTS + NUM_REDUNDANT
    load, l2p, count = attach_eplb_state(eplb, list(range(NUM_EXPERTS)) + list(range(NUM_REDUNDANT)))
    assert len(eplb.expert_weights) == eplb.num_moe_layers
    for i, (weights, layer) in enumerate(zip(eplb.expert_weights, eplb.moe_layers)):
        assert len(weights) == 2 and all(w.shape[0] == physical for w in weights)  # w13, w2
        state = layer.router.eplb_state
        assert state.expert_load_view.data_ptr() == load[i].data_ptr()
        assert torch.equal(state.logical_to_physical_map, l2p[i])
        assert torch.equal(state.logical_replica_count, count[i])


def test_redundant_replicas_hold_their_experts_weights(models):
    """Physical expert ``E + j`` is a copy of logical expert ``j`` (vLLM's initial
    arrangement), whichever way the checkpoint stores the experts."""
    plain, _ = models["plain"]
    eplb, _ = models["eplb"]
    initial = list(range(NUM_EXPERTS)) + list(range(NUM_REDUNDANT))
    for ref_layer, layer in zip(plain.moe_layers, eplb.moe_layers):
        for ref, weight in zip(ref_layer.get_expert_weights(), layer.get_expert_weights()):
            assert torch.equal(weight, ref[initial])


@pytest.fixture
def cuda_eplb_mapping(monkeypatch):
    """Routers map and record as on CUDA (see :func:`eplb_map_reference`)."""
    from vllm.model_executor.layers.fused_moe.router import base_router

    monkeypatch.setattr(base_router, "eplb_map_to_physical_and_record", eplb_map_reference)


def test_redundant_experts_give_the_same_output(models, cuda_eplb_mapping, record_property):
    """With vLLM's initial maps, tokens reach replicas (their load is recorded) and every MoE
    block's output equals the model without EPLB."""
    plain, plain_config = models["plain"]
    eplb, eplb_config = models["eplb"]
    load, _, _ = attach_eplb_state(eplb, list(range(NUM_EXPERTS)) + list(range(NUM_REDUNDANT)))
    want = moe_outputs(plain, plain_config, models["ffn_name"], models["x"])
    got = moe_outputs(eplb, eplb_config, models["ffn_name"], models["x"])
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    record_property("max_abs_diff", max((g - w).abs().max().item() for w, g in zip(want, got)))
    rows = NUM_TOKENS * plain.model.arch.top_k
    assert torch.equal(load.sum(dim=1), torch.full((eplb.num_moe_layers,), rows, dtype=load.dtype))
    assert (load[:, NUM_EXPERTS:].sum(dim=1) > 0).all(), "a layer sent no token to a redundant replica"


def test_rebalanced_experts_give_the_same_output(models, cuda_eplb_mapping, record_property):
    """A rebalance moves expert weights between physical slots (rows of
    ``model.expert_weights``, as vLLM's exchange does) and updates the maps in place; the
    routers then send every token to a slot holding its expert, and the output is unchanged.
    Routing without the maps would now pick the wrong experts."""
    plain, plain_config = models["plain"]
    eplb, eplb_config = models["eplb"]
    initial = list(range(NUM_EXPERTS)) + list(range(NUM_REDUNDANT))
    _, l2p, count = attach_eplb_state(eplb, initial)
    order = torch.randperm(len(initial), generator=torch.Generator().manual_seed(1)).tolist()
    moved = [initial[q] for q in order]  # slot p now holds what slot order[p] held
    assert moved[:NUM_EXPERTS] != list(range(NUM_EXPERTS))
    saved = [[w.clone() for w in weights] for weights in eplb.expert_weights]
    try:
        for weights in eplb.expert_weights:
            for w in weights:
                w.copy_(w[order])
        new_l2p, new_count = eplb_maps(moved, NUM_EXPERTS, eplb.num_moe_layers)
        l2p.fill_(-1)[..., : new_l2p.shape[-1]].copy_(new_l2p)
        count.copy_(new_count)

        want = moe_outputs(plain, plain_config, models["ffn_name"], models["x"])
        got = moe_outputs(eplb, eplb_config, models["ffn_name"], models["x"])
        for w, g in zip(want, got, strict=True):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
        record_property("max_abs_diff", max((g - w).abs().max().item() for w, g in zip(want, got)))
    finally:  # the module's other tests use the initial arrangement
        for weights, copies in zip(eplb.expert_weights, saved):
            for w, c in zip(weights, copies):
                w.copy_(c)
