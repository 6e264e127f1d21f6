"""Quantized Laguna checkpoints: int8 W8A8 linears on vLLM's CPU backend, and the NVFP4
name mapping.

int8 W8A8 runs in the activation dtype the CPU's kernel takes: on AMX vLLM runs
``int8_scaled_mm_with_quant`` (bf16/fp16 only; fp32 is refused at load), elsewhere oneDNN
(fp32 or bf16). Quantized experts and the fp8 KV cache have their own files
(``test_laguna_quantized_experts.py``, ``test_fp8_kv_cache.py``). NVFP4
(Laguna-M.1-NVFP4) needs a Blackwell GPU to run: its tensor names and scheme assignment are
checked without running it.
"""

from __future__ import annotations

import contextlib
import re

import pytest

from harness import INT8_W8A8, load_error, low_precision_gaps, prompts_for, vllm_run
from loaded_models import model_vllm_config
from quantized_checkpoints import NVFP4_QUANT_CONFIG, int8_w8a8, nvfp4_tensor_names
from vllm_laguna.cpu_kind import detect, missing
from vllm_laguna.tiny.laguna import build_laguna

PROMPTS = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=3)
AMX_INT8 = "int8 W8A8 linears on the AMX kernel (bf16/fp16 activations only)"


@pytest.fixture(scope="module")
def int8_checkpoints(tmp_path_factory):
    """An int8 W8A8 checkpoint and its dequantized twin. All MLPs dense: this is about the
    linears (quantized experts: test_laguna_quantized_experts.py)."""
    root = tmp_path_factory.mktemp("int8")
    base = build_laguna(root / "base", mlp_layer_types=["dense"] * 4)
    int8_w8a8(base, root / "int8", root / "twin")
    return root / "int8", root / "twin"


def _describe_quantization(model):
    layers = model.model.layers
    return {
        "qkv": type(getattr(layers[1].self_attn.qkv_proj, "scheme", None)).__name__,
        "o_proj": type(getattr(layers[1].self_attn.o_proj, "scheme", None)).__name__,
        "dense": type(getattr(layers[0].mlp.down_proj, "scheme", None)).__name__,
    }


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_int8_w8a8_close_to_twin(int8_checkpoints, dtype):
    """The int8 checkpoint loads through our model into vLLM's int8 kernels and stays within
    the int8 bounds (``harness.INT8_W8A8``) of exact arithmetic on its dequantized twin."""
    if dtype == "float32" and detect().amx:
        pytest.skip("AMX runs int8 W8A8 in bf16/fp16 only: test_int8_w8a8_in_fp32_refused_on_amx")
    quantized, twin = int8_checkpoints
    results, seen = vllm_run(
        quantized, PROMPTS, max_new_tokens=24, dtype=dtype, inspect=_describe_quantization, prompt_logprobs=True
    )
    assert set(seen.values()) == {"CompressedTensorsW8A8Int8"}, seen
    print(low_precision_gaps(twin, PROMPTS, results).assert_within(INT8_W8A8))


def test_int8_w8a8_in_fp32_refused_on_amx(int8_checkpoints):
    """Where vLLM would hand fp32 activations to its AMX int8 kernel (a kernel error on the
    first forward), the load fails, naming the dtype to use."""
    reason = missing(AMX_INT8)
    if reason:
        pytest.skip(reason)
    message = load_error(int8_checkpoints[0], dtype="float32")
    assert "UnsupportedOnCpu" in message and "use dtype='bfloat16'" in message, message


@contextlib.contextmanager
def _on_meta(ckpt, dtype: str, dist_dir):
    """Our LagunaForCausalLM for ``ckpt`` (its quantization config included), built on the
    meta device, with the VllmConfig it was built from.

    vLLM's ``get_rope`` caches rotary embeddings by their parameters for the life of the
    process: the meta ones made here are dropped again, or a later engine in this process
    with the same rope would get a rotary embedding without data."""
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import cleanup_dist_env_and_memory, init_distributed_environment, initialize_model_parallel
    from vllm.model_executor.layers.rotary_embedding import _ROPE_DICT

    from vllm_laguna.model_executor.models.laguna import LagunaForCausalLM

    vllm_config = model_vllm_config(ckpt, dtype)
    cached_ropes = dict(_ROPE_DICT)
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(1, 0, f"file://{dist_dir}", 0, "gloo")
        initialize_model_parallel(1, 1)
        try:
            with torch.device("meta"):
                yield LagunaForCausalLM(vllm_config=vllm_config), vllm_config
        finally:
            cleanup_dist_env_and_memory()
            _ROPE_DICT.clear()
            _ROPE_DICT.update(cached_ropes)


@pytest.fixture
def laguna_on_meta(default_vllm_config, tmp_path):
    """Our LagunaForCausalLM for the default tiny config, built on the meta device."""
    from transformers import AutoConfig

    ckpt = build_laguna(tmp_path / "ckpt")
    with _on_meta(ckpt, "bfloat16", tmp_path / "dist") as (model, _):
        yield model, AutoConfig.from_pretrained(ckpt)


def test_amx_int8_kernel_layers_found_in_the_built_model(int8_checkpoints, default_vllm_config, tmp_path, monkeypatch):
    """The load-time check finds the int8 linears vLLM would hand to its AMX kernel in a built
    model (an AMX CPU made up here, the real refusal is test_int8_w8a8_in_fp32_refused_on_amx):
    fp32 is refused, bf16 is not. The models are built as on an AVX2 CPU, whatever this one is,
    so that an AMX machine's own check does not refuse the fp32 one while it is built."""
    from vllm_laguna.cpu_kind import CpuKind
    from vllm_laguna.model_executor import cpu_support
    from vllm_laguna.model_executor.cpu_support import UnsupportedOnCpu, check_model

    amx = CpuKind(avx2=True, avx512=True, avx512_bf16=True, amx=True)
    monkeypatch.setattr(cpu_support, "detect", lambda: CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False))
    with _on_meta(int8_checkpoints[0], "float32", tmp_path / "dist32") as (model, vllm_config):
        with pytest.raises(UnsupportedOnCpu, match="use dtype='bfloat16'"):
            check_model(vllm_config, model, kind=amx)
    with _on_meta(int8_checkpoints[0], "bfloat16", tmp_path / "dist16") as (model, vllm_config):
        check_model(vllm_config, model, kind=amx)


def test_nvfp4_scheme_lands_on_the_right_modules(laguna_on_meta):
    """M.1-NVFP4's `ignore` list, matched against our module names the way vLLM's
    compressed-tensors config does (fused qkv/gate_up via packed_modules_mapping, experts by
    their unfused checkpoint names): attention and router stay bf16, dense MLPs, shared and
    routed experts get the NVFP4 scheme."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    model, _ = laguna_on_meta
    quant = CompressedTensorsConfig.from_config(NVFP4_QUANT_CONFIG)
    quant.packed_modules_mapping.update(model.packed_modules_mapping)
    quant._add_fused_moe_to_target_scheme_map()
    quantized, full = [], []
    for prefix, module in model.named_modules():
        if isinstance(module, RoutedExperts):
            names = [f"{module.layer_name}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
            schemes = [quant.get_scheme_dict(module, n) for n in names]
            assert all(s == schemes[0] for s in schemes)
            (quantized if schemes[0] is not None else full).append(module.layer_name)
        elif isinstance(module, LinearBase):
            (quantized if quant.get_scheme_dict(module, prefix) is not None else full).append(prefix)
    assert any(".experts" in p for p in quantized) and any("self_attn" in p for p in full)
    assert all(re.search(r"self_attn|mlp\.gate$|lm_head", p) for p in full), full
    assert all(re.search(r"mlp\.(gate_up_proj|down_proj|shared_expert|experts)", p) for p in quantized), quantized


def test_nvfp4_tensor_names_reach_our_parameters(laguna_on_meta):
    """Every tensor of an M.1-NVFP4-style checkpoint (packed weights, block and global scales,
    static k/v scales, Hub names) maps, through our weights mapper and the quant config's own
    mappers, onto a module of ours that owns it: a quantized linear, the experts' fused
    parameters, the attention KV-cache scales, or a plain parameter."""
    from vllm.model_executor.layers.attention import Attention
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    from quantized_checkpoints import NVFP4_SUFFIXES
    from vllm_laguna.tiny.laguna import LagunaTiny

    model, _ = laguna_on_meta
    quant = CompressedTensorsConfig.from_config(NVFP4_QUANT_CONFIG)
    quant.packed_modules_mapping.update(model.packed_modules_mapping)
    mapper = model.hf_to_vllm_mapper | quant.get_cache_scale_mapper()
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    experts = {m.layer_name: m for m in modules.values() if isinstance(m, RoutedExperts)}
    names = nvfp4_tensor_names(list(LagunaTiny().hub_state_dict()))
    assert any(n.endswith("weight_packed") for n in names) and any(n.endswith("k_scale") for n in names)
    for name in names:
        mapped = mapper.map_name(name)
        assert mapped is not None, name
        stem, _, leaf = mapped.rpartition(".")
        if ".mlp.experts." in mapped and leaf != "e_score_correction_bias":
            layer = experts[mapped.split(".mlp.experts.")[0] + ".mlp.experts"]
            targets = [w for _, w, _, _ in layer.get_expert_mapping(include_fused=True)]
            assert any(w in mapped for w in targets), mapped
        elif leaf in NVFP4_SUFFIXES:
            assert stem in modules and quant.get_scheme_dict(modules[stem], stem) is not None, mapped
        elif leaf in ("k_scale", "v_scale"):
            assert isinstance(modules.get(stem), Attention), mapped
        else:
            assert mapped in params, mapped


def test_amx_int8_linears_the_amx_packing_cannot_take_are_refused_by_name(default_vllm_config, tmp_path, monkeypatch):
    """16 heads with a per-head gate: ``g_proj`` has 16 outputs, which vLLM's AMX int8 kernel
    accepts (``N % 16 == 0``) and its weight packing then fails on (``Expected N == BLOCK_N``;
    XS.2's 48-head layers alike). The built model (an AMX CPU made up here) is refused naming
    the layer; on an AMX CPU the engine stops at load with that message."""
    from vllm_laguna.cpu_kind import CpuKind
    from vllm_laguna.model_executor import cpu_support
    from vllm_laguna.model_executor.cpu_support import UnsupportedOnCpu, check_model

    base = build_laguna(tmp_path / "base", mlp_layer_types=["dense"] * 4, heads_per_layer=[16] * 4)
    int8_w8a8(base, tmp_path / "int8", tmp_path / "twin")
    amx = CpuKind(avx2=True, avx512=True, avx512_bf16=True, amx=True)
    with monkeypatch.context() as patch:
        patch.setattr(cpu_support, "detect", lambda: CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False))
        with _on_meta(tmp_path / "int8", "bfloat16", tmp_path / "dist") as (model, vllm_config):
            with pytest.raises(UnsupportedOnCpu, match=r"model\.layers\.0\.self_attn\.g_proj \(16\).*g_proj\$"):
                check_model(vllm_config, model, kind=amx)
    if detect().amx:
        message = load_error(tmp_path / "int8")
        assert "UnsupportedOnCpu" in message and "g_proj (16)" in message, message
