"""What vLLM 0.32's CPU kernels run on this CPU kind, decided while the model is built.

vLLM picks its CPU kernels from the processor (torch's cpuinfo flags, see
:mod:`vllm_laguna.cpu_kind`) and from the checkpoint's quantization. Some combinations it
accepts at load then fail inside a kernel on the first forward (on AMX, int8 W8A8 linears in
fp32: ``int8_scaled_mm_with_quant: expect A to be bfloat16 or half``), others fail with an
error that does not say what would run (``No Int8 MoE backend supports the deployment
configuration``). :func:`refusal` decides from what a run asks for (:class:`CpuRequest`) and
the CPU whether vLLM can run it, and otherwise says what to use instead; the models call
:func:`check_experts` before building their fused-MoE layers and :func:`check_model` once
built, and both raise :class:`UnsupportedOnCpu` with that message.

What the rules encode (vLLM 0.32 sources):

* int8 W8A8 linears: on AMX, every layer with a symmetric-activation scheme, ``K % 32 == 0``
  and ``N % 16 == 0`` runs ``int8_scaled_mm_with_quant`` (``CPUInt8ScaledMMLinearKernel``),
  which takes bf16/fp16 activations only, and whose weight packing fails on ``N % 32 != 0``
  (Laguna-XS.2's per-head gate, 48 outputs); elsewhere oneDNN runs them in fp32 or bf16.
* quantized routed experts: vLLM's CPU MoE kernels for x86 (``CPUExpertsFp8``,
  ``CPUExpertsInt8``, ``CPUExpertsInt4`` in ``fused_moe/experts/cpu_moe.py``) are modular:
  the runner calls our router's ``select_experts`` and hands its ids and weights to the
  kernel (``runner/moe_runner.py``, ``RoutedExperts.forward_modular``). The MoE config's
  routing method is read once from the router (``layer.py``) and only gates which class is
  selected (``FusedMoEExperts.is_supported_config``); no modular class routes or renormalises
  by it. So our routers report the label the class for the experts' scheme accepts
  (:func:`cpu_routing_method`): ``DeepSeekV3`` for FP8 (128x128 blocks only,
  ``kFp8Static128BlockSym``), ``Renormalize`` for int8 W8A8 (channel weights, dynamic
  per-token activations) and int4 W4A16 (compressed-tensors pack-quantized, symmetric; group
  size 32 maps to ``kInt4Static32``, which the CPU class does not take). vLLM's three ask for
  AMX (``_supports_current_device``); ``fused_experts_cpu`` computes in bf16/fp16
  (``AT_DISPATCH_REDUCED_FLOATING_TYPES``) and is only in vLLM's ``_C`` build (AVX-512-BF16,
  AMX or not; ``_C_AVX2`` also lacks ``cpu_gemm_wna16``). ``layers/cpu_experts.py`` runs int8
  on every x86 CPU and dtype (``fused_experts_cpu`` without AMX, oneDNN int8 GEMMs on AVX2 and
  in fp32) and int4 on AVX-512-BF16 without AMX; FP8 stays AMX only. Monolithic kernels
  (zentorch's int4 on Zen CPUs with zentorch installed and ``VLLM_CPU_INT4_W4A8=1``; it
  accepts ``Renormalize`` and routes by softmax itself) must never take our layers:
  :func:`check_built_experts` refuses one once the layer is built. Router weights on the
  expert input (Llama 4's scheme) run with int8 only (our classes).
* int4 W4A16 linears: ``CPUWNA16LinearKernel`` runs ``cpu_gemm_wna16`` (``_C`` and
  ``_C_AVX512``, not ``_C_AVX2``), output and input widths in multiples of 32.
* the fp8 KV cache: ``cpu_attn._get_attn_isa`` needs AVX-512 or AMX.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vllm_laguna.cpu_kind import CpuKind, detect

if TYPE_CHECKING:
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType


class UnsupportedOnCpu(ValueError):
    """vLLM's CPU backend cannot run this combination on this CPU."""


#: quantized-expert schemes as :func:`expert_scheme` names them
INT8_EXPERTS = "int8 W8A8"
INT4_EXPERTS = "int4 W4A16 (compressed-tensors symmetric, group size other than 32; AWQ; GPTQ without act-order)"
FP8_BLOCK_EXPERTS = "FP8 with 128x128 blocks"
#: the schemes vLLM's CPU MoE kernels (or ours, ``layers/cpu_experts.py``) run with our routers' ids and weights
CPU_EXPERT_SCHEMES = (INT8_EXPERTS, INT4_EXPERTS, FP8_BLOCK_EXPERTS)

#: what to write in a compressed-tensors config to keep the routed experts unquantized
IGNORE_EXPERTS = "add 're:.*\\.experts\\..*' to the quantization config's `ignore` list"


@dataclass(frozen=True)
class CpuRequest:
    """What a run asks of vLLM's CPU kernels."""

    dtype: torch.dtype
    kv_cache_dtype: str = "auto"
    #: int8 W8A8 linears that vLLM runs with its AMX kernel where the CPU has AMX
    amx_int8_linears: bool = False
    #: of those, the ones (name, output width) whose width is not a multiple of 32
    amx_int8_misfits: tuple[tuple[str, int], ...] = ()
    #: int4 weight-only linears (vLLM's ``CPUWNA16LinearKernel``: ``cpu_gemm_wna16``)
    int4_linears: bool = False
    #: the routed experts' quantization (:func:`expert_scheme`), None when unquantized
    experts: str | None = None
    #: router weights scale the expert input (Llama 4) rather than its output
    router_weights_on_input: bool = False


def refusal(request: CpuRequest, kind: CpuKind) -> str | None:
    """None if vLLM's CPU backend runs ``request`` on a CPU of ``kind``, else why not and
    what to use instead."""
    low_precision = request.dtype in (torch.bfloat16, torch.float16)
    if request.kv_cache_dtype.startswith("fp8") and not (kind.avx512 or kind.amx):
        return (
            f"kv_cache_dtype={request.kv_cache_dtype!r} needs AVX-512 or AMX on vLLM's CPU backend "
            f"(this CPU is {kind.name}): use kv_cache_dtype='auto'"
        )
    if request.amx_int8_linears and kind.amx and not low_precision:
        return (
            f"int8 W8A8 linears on an AMX CPU run vLLM's int8_scaled_mm_with_quant kernel, which "
            f"takes bfloat16 or float16 activations, not {request.dtype}: use dtype='bfloat16'"
        )
    if request.amx_int8_misfits and kind.amx:
        shown = ", ".join(f"{name} ({width})" for name, width in request.amx_int8_misfits[:4])
        return (
            f"int8 W8A8 linears with an output width that is a multiple of 16 but not of 32 "
            f"({shown}{', ...' if len(request.amx_int8_misfits) > 4 else ''}): on an AMX CPU "
            f"vLLM hands them to its AMX kernel, whose weight packing (convert_weight_packed) "
            f"fails on them ('Expected N == BLOCK_N'): keep them unquantized (Laguna's per-head "
            f"gate: add 're:.*g_proj$' to the quantization config's ignore list)"
        )
    if request.int4_linears and not kind.avx512:
        return (
            f"int4 W4A16 linears run vLLM's cpu_gemm_wna16, which its {kind.name} build (_C_AVX2) "
            f"lacks: quantize the linears as int8 W8A8 (oneDNN, every x86 CPU) or keep them "
            f"unquantized (only the routed experts in the quantization config's targets)"
        )
    if request.experts is None:
        return None
    if request.experts == INT8_EXPERTS:
        return None  # vLLM's AMX class or ours (layers/cpu_experts.py): every x86 kind and dtype
    experts = f"routed experts quantized as {request.experts}"
    keep = f"keep the routed experts unquantized ({IGNORE_EXPERTS})"
    if request.router_weights_on_input:
        return (
            f"{experts}: this model applies router weights to the expert input, which none of "
            f"vLLM's CPU int4/FP8 MoE kernels supports: quantize the experts as {INT8_EXPERTS} "
            f"(channel weights, dynamic per-token activations) or {keep}"
        )
    if request.experts not in CPU_EXPERT_SCHEMES:
        return (
            f"{experts}: vLLM's CPU backend has no MoE kernel for that scheme: quantize the "
            f"experts as {INT8_EXPERTS} (channel weights, dynamic per-token activations; every "
            f"x86 CPU), {INT4_EXPERTS} (compressed-tensors pack-quantized; AVX-512-BF16 or AMX) "
            f"or {FP8_BLOCK_EXPERTS} (weights strategy 'block', block_structure [128, 128]; AMX), "
            f"or {keep}"
        )
    if request.experts == FP8_BLOCK_EXPERTS and not kind.amx:
        return f"{experts}: vLLM's CPU FP8 MoE kernels need AMX (this CPU is {kind.name}): {keep}, or run on an AMX CPU"
    if request.experts == INT4_EXPERTS and not kind.avx512_bf16:
        return (
            f"{experts}: this CPU is {kind.name} without AVX512-BF16, where vLLM loads a kernel "
            f"build without fused_experts_cpu (no int4 MoE kernel; _C_AVX2 also lacks "
            f"cpu_gemm_wna16): quantize the experts as {INT8_EXPERTS}, which runs on every x86 "
            f"CPU, or {keep}, or run on an AVX-512-BF16 or AMX CPU"
        )
    if not low_precision:
        return (
            f"{experts}: vLLM's CPU int4/FP8 MoE kernels take bfloat16 or float16 activations, "
            f"not {request.dtype}: use dtype='bfloat16'"
        )
    return None


def cpu_routing_method(scheme: str | None) -> RoutingMethodType:
    """The ``RoutingMethodType`` our routers report on the CPU backend for routed experts
    quantized as ``scheme`` (:func:`expert_scheme`): a label the vLLM class for that scheme
    accepts, ``Renormalize`` for int8/int4 (``CPUExpertsInt8``/``CPUExpertsInt4``) and
    ``DeepSeekV3`` otherwise (``CPUExpertsFp8``, the unquantized classes, which accept any).
    The label only picks the class; the class takes our router's ids and weights."""
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType

    if scheme in (INT8_EXPERTS, INT4_EXPERTS):
        return RoutingMethodType.Renormalize
    return RoutingMethodType.DeepSeekV3


def expert_scheme(quant_config, experts_prefix: str) -> str | None:
    """How ``quant_config`` quantizes the fused-MoE layer ``experts_prefix`` (vLLM's own
    target/ignore matching), None if it leaves it unquantized."""
    if quant_config is None:
        return None
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )
    from vllm.model_executor.layers.quantization.auto_awq import AutoAWQConfig
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.fp8 import Fp8Config
    from vllm.model_executor.layers.quantization.utils.quant_utils import is_layer_skipped

    if isinstance(quant_config, CompressedTensorsConfig):
        # as vLLM's CompressedTensorsMoEMethod.get_moe_method: a "Linear" target covers the
        # experts, matched by module class and by the unfused expert names
        quant_config._add_fused_moe_to_target_scheme_map()
        probe = RoutedExperts.__new__(RoutedExperts)
        scheme = quant_config.get_scheme_dict(probe, f"{experts_prefix}.0.gate_proj")
        if scheme is None:
            return None
        weights, inputs = scheme.get("weights"), scheme.get("input_activations")
        if weights is None:
            return None
        if weights.type == "int" and weights.num_bits == 8 and inputs is not None and inputs.num_bits == 8:
            return INT8_EXPERTS
        if weights.type == "int" and weights.num_bits == 4 and inputs is None:
            return _int4_scheme(weights)
        if weights.type == "float" and weights.num_bits == 8:
            block = list(weights.block_structure or []) if weights.strategy == "block" else []
            return FP8_BLOCK_EXPERTS if block == [128, 128] else f"FP8 ({weights.strategy} scales)"
        return f"{weights.type}{weights.num_bits} ({weights.strategy})"
    if isinstance(quant_config, (AutoAWQConfig, AutoGPTQConfig)):
        if isinstance(quant_config, AutoAWQConfig) and is_layer_skipped(
            experts_prefix, quant_config.modules_to_not_convert, match_mode="substring"
        ):
            return None
        name = "AWQ" if isinstance(quant_config, AutoAWQConfig) else "GPTQ"
        if quant_config.weight_bits != 4:
            return f"{name} int{quant_config.weight_bits}"
        if getattr(quant_config, "desc_act", False):
            return f"{name} int4 W4A16 (activation-ordered groups)"
        return INT4_EXPERTS
    if isinstance(quant_config, Fp8Config):
        if is_layer_skipped(
            experts_prefix,
            quant_config.ignored_layers,
            quant_config.packed_modules_mapping,
            match_mode=quant_config.ignored_layers_match_mode,
        ):
            return None
        block = list(quant_config.weight_block_size or [])
        return FP8_BLOCK_EXPERTS if block == [128, 128] else "FP8 (per-tensor scales)"
    return quant_config.get_name()


def _int4_scheme(weights) -> str:
    """The name of an int4 weight-only compressed-tensors scheme: :data:`INT4_EXPERTS` where
    vLLM's ``CPUExpertsInt4`` takes it (symmetric group scales, no activation reordering,
    group size not 32, whose ``kInt4Static32`` key the CPU class does not list)."""
    if weights.strategy != "group" or weights.group_size is None:
        return f"int4 W4A16 ({weights.strategy} scales)"
    if not weights.symmetric:
        return "int4 W4A16 (asymmetric)"
    if weights.actorder == "group":
        return "int4 W4A16 (activation-ordered groups)"
    if weights.group_size == 32:
        return "int4 W4A16 (group size 32)"
    return INT4_EXPERTS


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _raise_if_refused(request: CpuRequest, kind: CpuKind | None) -> None:
    reason = refusal(request, kind or detect())
    if reason is not None:
        raise UnsupportedOnCpu(reason)


def check_experts(
    quant_config, experts_prefix: str, router_weights_on_input: bool = False, kind: CpuKind | None = None
) -> None:
    """Before a fused-MoE layer is built: refuse quantized experts vLLM's CPU kernels cannot run."""
    if not _on_cpu():
        return
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    request = CpuRequest(
        dtype=model_config.dtype if model_config is not None else torch.get_default_dtype(),
        experts=expert_scheme(quant_config, experts_prefix),
        router_weights_on_input=router_weights_on_input,
    )
    _raise_if_refused(request, kind)


def check_built_experts(runner: torch.nn.Module, prefix: str) -> None:
    """Once a fused-MoE layer (vLLM's ``MoERunner``) is built: refuse a monolithic experts
    kernel, which takes the router logits and routes by softmax itself, ignoring our router.
    On vLLM 0.32 the one x86 can pick is zentorch's int4 MoE (``ZentorchExpertsInt4``: a Zen
    CPU with zentorch installed, ``VLLM_CPU_INT4_W4A8`` on, its default); vLLM 0.33 excludes
    such kernels itself (``supports_monolithic_kernels``)."""
    if not _on_cpu():
        return
    method = runner.routed_experts.quant_method
    if method.is_monolithic:
        kernel = getattr(getattr(method, "experts_cls", None), "__name__", type(method).__name__)
        raise UnsupportedOnCpu(
            f"vLLM picked {kernel} for {prefix}, a MoE kernel that routes by softmax itself, "
            f"which is not this model's routing: set VLLM_CPU_INT4_W4A8=0 (vLLM then runs int4 "
            f"experts with CPUExpertsInt4, on AVX-512-BF16 and AMX) or {IGNORE_EXPERTS}"
        )


def check_model(vllm_config, model: torch.nn.Module, kind: CpuKind | None = None) -> None:
    """Once the model's layers exist: refuse its linear-layer quantization or KV-cache dtype
    where vLLM's CPU kernels cannot run them."""
    if not _on_cpu():
        return
    amx_int8 = [(name, m) for name, m in model.named_modules() if _runs_amx_int8_kernel(m)]
    request = CpuRequest(
        dtype=vllm_config.model_config.dtype,
        kv_cache_dtype=vllm_config.cache_config.cache_dtype,
        amx_int8_linears=bool(amx_int8),
        amx_int8_misfits=tuple(
            (name, m.output_size_per_partition) for name, m in amx_int8 if m.output_size_per_partition % 32
        ),
        int4_linears=any(_is_int4_linear(m) for m in model.modules()),
    )
    _raise_if_refused(request, kind)


def _is_int4_linear(module: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

    return isinstance(getattr(module, "scheme", None), CompressedTensorsWNA16)


def _runs_amx_int8_kernel(module: torch.nn.Module) -> bool:
    """``module`` is an int8 W8A8 linear that vLLM hands to ``int8_scaled_mm_with_quant`` on
    AMX (``CPUInt8ScaledMMLinearKernel``: symmetric activations, ``check_cpu_sgl_kernel``)."""
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsW8A8Int8

    scheme = getattr(module, "scheme", None)
    if not isinstance(scheme, CompressedTensorsW8A8Int8) or not scheme.input_symmetric:
        return False
    return module.input_size_per_partition % 32 == 0 and module.output_size_per_partition % 16 == 0
