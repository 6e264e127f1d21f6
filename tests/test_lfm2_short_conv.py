"""LFM2's conv layer against what vLLM hands it: the step's metadata (present in every real
step, absent in vLLM's dummy runs, and nothing else), the engine features it refuses, and its
decode step on vLLM's CPU backend (vLLM's C++ kernel, checked against the torch reference).
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


def _decode_inputs(dtype, state_dtype, layout, bias, requests=5, channels=64, kernel=3, slots=20):
    gen = torch.Generator().manual_seed(0)
    shape = (slots, kernel - 1, channels) if layout == "SD" else (slots, channels, kernel - 1)
    store = torch.randn(shape, generator=gen).to(state_dtype)
    state = store.transpose(1, 2) if layout == "SD" else store  # the layer's [slots, D, L - 1] view
    weight = torch.randn(channels, kernel, generator=gen).to(dtype)
    b = torch.randn(channels, generator=gen).to(dtype) if bias else None
    x = torch.randn(requests, channels, generator=gen).to(dtype)
    # one slot column per request, as vLLM's metadata holds them ([N, 1] int32)
    slot_ids = torch.tensor([[3], [7], [1], [19], [0]], dtype=torch.int32)[:requests, 0]
    return x, weight, b, state, slot_ids


@pytest.mark.skipif(
    not short_conv.vllm_cpu_conv_update_available(),
    reason="vLLM's C++ causal-conv decode kernel is only in vLLM's x86 CPU build",
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["SD", "DS"])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_cpu_decode_step_runs_vllms_kernel_and_equals_the_reference(monkeypatch, dtype, layout, bias):
    """On vLLM's x86 CPU backend a decode step is one call of vLLM's C++ kernel, and it gives
    the torch reference's new states bit for bit (a shift of the inputs) and its outputs up to
    summation order: both sum the same L + 1 terms in fp32 (measured on AVX2: equal bit for bit
    but for fp32 with a bias, an ulp apart). Each order lies within (L + 1) fp32 epsilons of the
    terms' absolute sum from the exact sum, so the two outputs differ by at most twice that plus
    one rounding step of the output dtype."""
    from vllm_laguna.kernels.causal_conv1d import causal_conv1d_decode_torch

    kernel_calls = []
    vllm_kernel = torch.ops._C.causal_conv1d_update_cpu_vec
    monkeypatch.setattr(
        torch.ops._C, "causal_conv1d_update_cpu_vec", lambda *a: kernel_calls.append(1) or vllm_kernel(*a)
    )
    x, weight, b, state, slot_ids = _decode_inputs(dtype, dtype, layout, bias)
    state_before = state.clone()
    expected_state = state.clone()
    expected = causal_conv1d_decode_torch(x, weight, b, expected_state, slot_ids)
    out = short_conv.conv_decode_step(x, weight, b, state, slot_ids)
    assert kernel_calls == [1]
    assert torch.equal(state, expected_state)
    taps = weight.shape[1] + 1  # L products and the bias
    terms = causal_conv1d_decode_torch(  # the absolute sum of each output's terms
        x.abs(), weight.abs(), None if b is None else b.abs(), state_before.abs(), slot_ids
    ).double()
    bound = 2 * taps * torch.finfo(torch.float32).eps * terms + torch.finfo(dtype).eps * expected.double().abs()
    assert ((out.double() - expected.double()).abs() <= bound).all()


def test_conv_state_in_another_dtype_takes_the_reference(monkeypatch):
    """A conv state kept in another dtype than the model (``mamba_cache_dtype``) is rounded as
    the torch reference defines; vLLM's kernel is not asked to."""
    from vllm_laguna.kernels.causal_conv1d import causal_conv1d_decode_torch

    monkeypatch.setattr(
        torch.ops._C,
        "causal_conv1d_update_cpu_vec",
        lambda *a: pytest.fail("vLLM's kernel ran on mixed dtypes"),
        raising=False,  # builds without the kernel
    )
    x, weight, b, state, slot_ids = _decode_inputs(torch.float32, torch.bfloat16, "SD", True)
    expected_state = state.clone()
    expected = causal_conv1d_decode_torch(x, weight, b, expected_state, slot_ids)
    assert torch.equal(short_conv.conv_decode_step(x, weight, b, state, slot_ids), expected)
    assert torch.equal(state, expected_state)
