"""Llama 4 attention as built for an engine: which layers apply attention-temperature tuning."""

from __future__ import annotations

import pytest
import torch

from loaded_models import load_model, process_group  # noqa: F401 (module-scoped fixture)
from vllm_laguna.model_executor.layers.llama4_attention import attention_temperature
from vllm_laguna.tiny.llama4 import build_llama4


@pytest.mark.parametrize("floor_scale, tuned", [(16, True), (256, True), (512, False)])
def test_temperature_multiply_only_where_positions_reach_floor_scale(floor_scale, tuned, process_group, tmp_path):
    """The engine's positions run to max_model_len - 1 (256 tokens here): the NoPE layers scale
    q only when that reaches floor_scale - 1, where the scale first leaves 1."""
    model, vllm_config = load_model(build_llama4(tmp_path / "ckpt", floor_scale=floor_scale))
    assert vllm_config.model_config.max_model_len == 256
    nope = [layer.self_attn for layer in model.model.layers if layer.self_attn.rotary_emb is None]
    assert nope and all((attn.temperature is not None) == tuned for attn in nope)
    # what skipping leaves out is a multiply by exactly 1
    scale = attention_temperature(torch.arange(floor_scale - 1), float(floor_scale), 0.1)
    assert torch.equal(scale, torch.ones_like(scale))
    assert attention_temperature(torch.tensor([floor_scale - 1]), float(floor_scale), 0.1).item() > 1
