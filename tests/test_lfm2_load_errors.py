"""A broken LFM2 checkpoint fails when vLLM loads it, naming the field or tensor."""

from __future__ import annotations

import pytest

from checkpoint_edits import edit_config, rewrite_tensors
from harness import vllm_greedy
from vllm_laguna.tiny.lfm2 import build_lfm2


def _load(ckpt):
    vllm_greedy(ckpt, [[40, 41, 42]], max_new_tokens=1)


@pytest.fixture
def ckpt(tmp_path):
    layer_types = ["conv", "full_attention", "conv"]
    return build_lfm2(tmp_path / "ckpt", config_form="hub", num_layers=3, layer_types=layer_types)


def test_conv_dim_contradicting_hidden_size(ckpt):
    edit_config(ckpt, conv_dim=128)
    with pytest.raises(Exception, match=r"`conv_dim`: expected hidden_size=64"):
        _load(ckpt)


def test_conv_bias_in_checkpoint_but_not_in_config(ckpt):
    def add_bias(tensors):
        if "model.layers.2.conv.out_proj.weight" in tensors:
            tensors["model.layers.2.conv.out_proj.bias"] = tensors["model.layers.2.conv.out_proj.weight"][:, 0].clone()
        return tensors

    rewrite_tensors(ckpt, add_bias)
    with pytest.raises(Exception, match=r"'model\.layers\.2\.conv\.out_proj\.bias'.*conv_bias: false"):
        _load(ckpt)


def test_missing_conv_kernel(ckpt):
    rewrite_tensors(ckpt, lambda t: {n: v for n, v in t.items() if n != "model.layers.2.conv.conv.weight"})
    with pytest.raises(Exception, match=r"missing tensors: model\.layers\.2\.conv\.conv\.weight"):
        _load(ckpt)


def test_conv_kernel_size_contradicting_conv_L_cache(ckpt):
    edit_config(ckpt, conv_L_cache=4)  # weights have 3 taps
    with pytest.raises(Exception, match=r"conv\.conv\.weight has shape \[64, 1, 3\].*expects \[64, 1, 4\]"):
        _load(ckpt)
