"""The load-time decision on what vLLM's CPU kernels run (``model_executor/cpu_support.py``),
for every CPU kind, with made-up ``CpuKind``s: the real refusals run in the engine tests of
``test_laguna_quantized.py``, ``test_laguna_quantized_experts.py`` and ``test_fp8_kv_cache.py``."""

from __future__ import annotations

import pytest
import torch

from quantized_checkpoints import fp8_block_quant_config, int8_quant_config
from vllm_laguna.cpu_kind import CpuKind
from vllm_laguna.model_executor.cpu_support import (
    FP8_BLOCK_EXPERTS,
    INT8_EXPERTS,
    CpuRequest,
    expert_scheme,
    refusal,
)

AVX2 = CpuKind(avx2=True, avx512=False, avx512_bf16=False, amx=False)
AVX512 = CpuKind(avx2=True, avx512=True, avx512_bf16=False, amx=False)
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


@pytest.mark.parametrize("scheme", [INT8_EXPERTS, "FP8 (channel scales)", "int4 (group)"])
def test_other_quantized_experts_are_refused_with_what_runs(scheme):
    for kind in (AVX2, AMX):
        reason = refusal(CpuRequest(dtype=BF16, experts=scheme), kind)
        assert scheme in reason and "softmax routing" in reason
        assert FP8_BLOCK_EXPERTS in reason and "ignore" in reason


def test_router_weights_on_the_expert_input_refuse_every_quantized_scheme():
    for scheme in (FP8_BLOCK_EXPERTS, INT8_EXPERTS):
        reason = refusal(CpuRequest(dtype=BF16, experts=scheme, router_weights_on_input=True), AMX)
        assert "expert input" in reason and "unquantized" in reason


def test_expert_scheme_follows_vllms_matching():
    """The scheme the compressed-tensors config gives a fused-MoE layer, through vLLM's own
    target and ignore matching: experts only (regex target), every Linear (class target,
    which vLLM extends to fused experts), and experts listed in `ignore`."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    experts = "model.layers.1.mlp.experts"

    def scheme(config):
        return expert_scheme(CompressedTensorsConfig.from_config(config), experts)

    assert scheme(fp8_block_quant_config()) == FP8_BLOCK_EXPERTS
    assert scheme(int8_quant_config(targets=["Linear"], ignore=["lm_head"])) == INT8_EXPERTS
    assert scheme(int8_quant_config(targets=["Linear"], ignore=["re:.*\\.experts\\..*"])) is None
    assert expert_scheme(None, experts) is None


def test_every_cpu_path_names_the_isa_it_needs():
    from vllm_laguna.cpu_kind import CPU_PATHS, missing

    for path, needs in CPU_PATHS.items():
        assert missing(path, AMX) is None
        reason = missing(path, AVX2)
        assert reason.startswith(path) and all(isa in reason for isa in needs) and "AVX2" in reason
