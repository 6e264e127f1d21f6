"""The load-time decision on what vLLM's CPU kernels run (``model_executor/cpu_support.py``),
for every CPU kind, with made-up ``CpuKind``s: the real refusals run in the engine tests of
``test_laguna_quantized.py``, ``test_laguna_quantized_experts.py`` and ``test_fp8_kv_cache.py``."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from quantized_checkpoints import fp8_block_quant_config, int8_quant_config
from vllm_laguna.cpu_kind import CpuKind
from vllm_laguna.model_executor.cpu_support import (
    FP8_BLOCK_EXPERTS,
    INT4_EXPERTS,
    INT8_EXPERTS,
    CpuRequest,
    UnsupportedOnCpu,
    check_built_experts,
    cpu_routing_method,
    expert_scheme,
    refusal,
)

AVX2 = CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False)
AVX512 = CpuKind(avx2=True, avx512=True, avx512_bf16=False, amx=False)
ZEN4 = CpuKind(avx2=True, avx512=True, avx512_bf16=True, amx=False)
AMX = CpuKind(avx2=True, avx512=True, avx512_bf16=True, amx=True)
BF16, FP32 = torch.bfloat16, torch.float32


def test_unquantized_runs_everywhere():
    for kind in (AVX2, AVX512, AMX):
        for dtype in (BF16, FP32):
            assert refusal(CpuRequest(dtype=dtype), kind) is None


@pytest.mark.parametrize("kind, allowed", [(AVX2, False), (AVX512, True), (AMX, True)])
def test_fp8_kv_cache_needs_avx512_or_amx(kind, allowed):
    reason = refusal(CpuRequest(dtype=BF16, kv_cache_dtype="fp8"), kind)
    assert (reason is None) == allowed
    if not allowed:
        assert "AVX-512 or AMX" in reason and "AVX2" in reason and "kv_cache_dtype='auto'" in reason


def test_int8_linears_take_bf16_on_amx_only():
    """fp32 with int8 W8A8 linears is refused on AMX (vLLM's AMX kernel takes bf16/fp16),
    accepted where oneDNN runs them; bf16 runs everywhere."""
    fp32 = CpuRequest(dtype=FP32, amx_int8_linears=True)
    assert "use dtype='bfloat16'" in refusal(fp32, AMX)
    assert refusal(fp32, AVX2) is None and refusal(fp32, AVX512) is None
    for kind in (AVX2, AVX512, AMX):
        assert refusal(CpuRequest(dtype=BF16, amx_int8_linears=True), kind) is None


def test_fp8_block_experts_need_amx_and_bf16():
    request = CpuRequest(dtype=BF16, experts=FP8_BLOCK_EXPERTS)
    assert refusal(request, AMX) is None
    for kind in (AVX2, AVX512):
        reason = refusal(request, kind)
        assert "need AMX" in reason and kind.name in reason and "ignore" in reason
    reason = refusal(CpuRequest(dtype=FP32, experts=FP8_BLOCK_EXPERTS), AMX)
    assert "use dtype='bfloat16'" in reason


@pytest.mark.parametrize("kind", [AVX2, AVX512, ZEN4, AMX], ids=["AVX2", "AVX-512", "AVX-512-BF16", "AMX"])
@pytest.mark.parametrize("dtype", [BF16, FP32], ids=["bf16", "fp32"])
def test_int8_experts_run_on_every_cpu_kind_and_dtype(kind, dtype):
    """vLLM's CPUExpertsInt8 (AMX, bf16), our FusedInt8Experts (AVX-512-BF16) or our oneDNN
    experts (AVX2, fp32) take every int8 W8A8 layer: nothing to refuse."""
    assert refusal(CpuRequest(dtype=dtype, experts=INT8_EXPERTS), kind) is None
    assert refusal(CpuRequest(dtype=dtype, experts=INT8_EXPERTS, router_weights_on_input=True), kind) is None


def test_int4_experts_run_where_fused_experts_cpu_is_built_in_bf16():
    """CPUExpertsInt4 runs on AMX and AVX-512-BF16 (vLLM's _C build), in bf16/fp16 only."""
    for kind in (ZEN4, AMX):
        assert refusal(CpuRequest(dtype=BF16, experts=INT4_EXPERTS), kind) is None
        assert "use dtype='bfloat16'" in refusal(CpuRequest(dtype=FP32, experts=INT4_EXPERTS), kind)


@pytest.mark.parametrize("kind", [AVX2, AVX512], ids=["AVX2", "AVX-512"])
def test_int4_experts_without_avx512_bf16_name_the_missing_kernel_and_int8(kind):
    reason = refusal(CpuRequest(dtype=BF16, experts=INT4_EXPERTS), kind)
    assert "fused_experts_cpu" in reason and kind.name in reason and INT8_EXPERTS in reason
    assert "ignore" in reason and "AVX-512-BF16 or AMX CPU" in reason


@pytest.mark.parametrize(
    "scheme", ["FP8 (channel scales)", "int4 W4A16 (group size 32)", "int4 W4A16 (asymmetric)", "int8 (channel)"]
)
def test_schemes_without_a_cpu_moe_kernel_are_refused_with_what_runs(scheme):
    for kind in (AVX2, AMX):
        reason = refusal(CpuRequest(dtype=BF16, experts=scheme), kind)
        assert scheme in reason and "no MoE kernel for that scheme" in reason
        assert all(s in reason for s in (INT8_EXPERTS, INT4_EXPERTS, FP8_BLOCK_EXPERTS)) and "ignore" in reason


def test_router_weights_on_the_expert_input_refuse_int4_and_fp8_naming_int8():
    for scheme in (FP8_BLOCK_EXPERTS, INT4_EXPERTS):
        reason = refusal(CpuRequest(dtype=BF16, experts=scheme, router_weights_on_input=True), AMX)
        assert "expert input" in reason and "unquantized" in reason and INT8_EXPERTS in reason


def test_the_routing_label_is_one_vllms_class_for_the_scheme_accepts():
    """Our router reports, per expert scheme, a routing method the vLLM 0.32 CPU class that
    runs it lists (the label only selects the class, which takes our ids and weights)."""
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import (
        CPUExpertsFp8,
        CPUExpertsInt4,
        CPUExpertsInt8,
        X86CPUUnquantizedExperts,
    )
    from vllm.model_executor.layers.quantization.utils.quant_utils import (
        kFp8Static128BlockSym,
        kInt4Static,
        kInt8DynamicTokenSym,
        kInt8StaticChannelSym,
    )

    cases = [
        (CPUExpertsInt8, INT8_EXPERTS, kInt8StaticChannelSym, kInt8DynamicTokenSym),
        (CPUExpertsInt4, INT4_EXPERTS, kInt4Static, None),
        (CPUExpertsFp8, FP8_BLOCK_EXPERTS, kFp8Static128BlockSym, None),
        (X86CPUUnquantizedExperts, None, None, None),
    ]
    for cls, scheme, weight_key, activation_key in cases:
        label = cpu_routing_method(scheme)
        assert cls._supports_routing_method(label, weight_key, activation_key), (cls.__name__, label)
        assert cls.is_monolithic() is False, cls.__name__
    assert cpu_routing_method(INT8_EXPERTS) == RoutingMethodType.Renormalize
    assert cpu_routing_method(FP8_BLOCK_EXPERTS) == cpu_routing_method(None) == RoutingMethodType.DeepSeekV3


def test_a_monolithic_experts_kernel_is_refused_once_built():
    """zentorch's int4 MoE (a Zen CPU with zentorch installed, VLLM_CPU_INT4_W4A8 on by
    default) accepts the label int4 experts report and routes by softmax itself: once vLLM
    has picked it for a layer, the load stops, naming it and the switch; a modular pick passes."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4
    from vllm.model_executor.layers.fused_moe.experts.zentorch_moe import ZentorchExpertsInt4
    from vllm.model_executor.layers.quantization.utils.quant_utils import kInt4Static

    assert ZentorchExpertsInt4._supports_routing_method(cpu_routing_method(INT4_EXPERTS), kInt4Static, None)

    def runner(cls):
        method = SimpleNamespace(is_monolithic=cls.is_monolithic(), experts_cls=cls)
        return SimpleNamespace(routed_experts=SimpleNamespace(quant_method=method))

    with pytest.raises(UnsupportedOnCpu, match="ZentorchExpertsInt4.*routes by softmax.*VLLM_CPU_INT4_W4A8=0"):
        check_built_experts(runner(ZentorchExpertsInt4), "model.layers.1.mlp.experts")
    check_built_experts(runner(CPUExpertsInt4), "model.layers.1.mlp.experts")


def _int4_config(**weights) -> dict:
    """compressed-tensors W4A16 on the routed experts, with ``weights`` overriding the preset's."""
    args = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True, "dynamic": False}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["re:.*mlp\\.experts\\..*"], "weights": {**args, **weights}}},
        "ignore": ["lm_head"],
    }


def test_expert_scheme_follows_vllms_matching():
    """The scheme the compressed-tensors config gives a fused-MoE layer, through vLLM's own
    target and ignore matching: experts only (regex target), every Linear (class target,
    which vLLM extends to fused experts), and experts listed in `ignore`; int4 weight-only
    schemes vLLM's CPUExpertsInt4 takes, and those it does not (group size 32, asymmetric)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    experts = "model.layers.1.mlp.experts"

    def scheme(config):
        return expert_scheme(CompressedTensorsConfig.from_config(config), experts)

    assert scheme(fp8_block_quant_config()) == FP8_BLOCK_EXPERTS
    assert scheme(int8_quant_config(targets=["Linear"], ignore=["lm_head"])) == INT8_EXPERTS
    assert scheme(int8_quant_config(targets=["Linear"], ignore=["re:.*\\.experts\\..*"])) is None
    assert scheme(_int4_config()) == scheme(_int4_config(group_size=64)) == INT4_EXPERTS
    assert scheme(_int4_config(group_size=32)) == "int4 W4A16 (group size 32)"
    assert scheme(_int4_config(symmetric=False)) == "int4 W4A16 (asymmetric)"
    assert expert_scheme(None, experts) is None


def test_every_cpu_path_names_the_isa_it_needs():
    from vllm_laguna.cpu_kind import CPU_PATHS, missing

    for path, needs in CPU_PATHS.items():
        assert missing(path, AMX) is None
        reason = missing(path, AVX2)
        if "AVX2" in needs:
            assert reason is None, path
        else:
            assert reason.startswith(path) and all(isa in reason for isa in needs) and "AVX2" in reason


def test_int4_linears_need_an_avx512_build():
    request = CpuRequest(dtype=BF16, int4_linears=True)
    for kind in (AVX512, ZEN4, AMX):
        assert refusal(request, kind) is None
    reason = refusal(request, AVX2)
    assert "cpu_gemm_wna16" in reason and "AVX2" in reason and "int8 W8A8" in reason


def test_amx_int8_linears_whose_width_the_amx_packing_cannot_take_are_refused_by_name():
    """vLLM's AMX int8 linear kernel takes N % 16 == 0 layers but packs weights in blocks of
    32 outputs (``Expected N == BLOCK_N`` at load): such layers are refused on AMX, named."""
    request = CpuRequest(dtype=BF16, amx_int8_linears=True, amx_int8_misfits=(("model.layers.0.self_attn.g_proj", 48),))
    reason = refusal(request, AMX)
    assert "model.layers.0.self_attn.g_proj (48)" in reason and "g_proj" in reason and "ignore" in reason
    for kind in (AVX2, AVX512, ZEN4):
        assert refusal(request, kind) is None
