"""LFM2's conv layer against what vLLM hands it: the step's metadata (present in every real
step, absent in vLLM's dummy runs, and nothing else), and the engine features it refuses.
``test_lfm2_parity.test_conv_state_in_another_dtype_than_the_model`` shows vLLM's start-up
profile run is the dummy run reaching the layer without metadata."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from vllm_laguna.model_executor.layers import short_conv

LAYER = "model.layers.0.conv"


def _step(monkeypatch, attn_metadata) -> None:
    """Sets what ``get_forward_context()`` returns inside the layer for this step."""
    monkeypatch.setattr(short_conv, "get_forward_context", lambda: SimpleNamespace(attn_metadata=attn_metadata))


def _conv_metadata():
    from vllm.v1.attention.backends.short_conv_attn import ShortConvAttentionMetadata

    return object.__new__(ShortConvAttentionMetadata)


def test_dummy_run_without_metadata_passes_through(monkeypatch):
    """vLLM's profile run, compile warm-up and piecewise graph capture run the model with no
    attention metadata at all: no request holds a slot, the output is discarded."""
    _step(monkeypatch, None)
    assert short_conv.step_metadata(LAYER) is None
    bx, out = torch.randn(5, 8), torch.empty(5, 8)
    short_conv.ShortConv.conv_with_state(SimpleNamespace(prefix=LAYER), bx, out)
    assert torch.equal(out, bx)


def test_real_step_returns_the_layers_metadata(monkeypatch):
    metadata = _conv_metadata()
    _step(monkeypatch, {LAYER: metadata, "model.layers.2.self_attn.attn": object()})
    assert short_conv.step_metadata(LAYER) is metadata


@pytest.mark.parametrize(
    ("attn_metadata", "got"),
    [
        ({}, "NoneType from dict"),  # the layer's state was never allocated
        ({"model.layers.1.conv": "other"}, "NoneType from dict"),
        ({LAYER: "attention metadata"}, "str from dict"),
        ([{LAYER: "ubatch"}], "list from list"),  # micro-batched steps are not supported
    ],
)
def test_missing_metadata_in_a_real_step_raises_with_the_layer_name(monkeypatch, attn_metadata, got):
    _step(monkeypatch, attn_metadata)
    with pytest.raises(RuntimeError, match=rf"^{LAYER}: this step has no short-conv metadata .*\(got {got} "):
        short_conv.step_metadata(LAYER)
    with pytest.raises(RuntimeError, match=LAYER):
        short_conv.ShortConv.conv_with_state(SimpleNamespace(prefix=LAYER), torch.randn(2, 8), torch.empty(2, 8))


def test_speculative_decoding_is_refused_by_name():
    from vllm.config import VllmConfig

    short_conv.check_supported(VllmConfig())  # no speculation: fine
    config = VllmConfig()
    config.speculative_config = SimpleNamespace(num_speculative_tokens=3)
    assert config.num_speculative_tokens == 3
    with pytest.raises(NotImplementedError, match="LFM2 conv layers .* do not support speculative decoding"):
        short_conv.check_supported(config)
