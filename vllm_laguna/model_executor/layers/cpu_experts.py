"""Quantized routed experts on the x86 CPUs vLLM 0.32's own MoE classes leave out.

vLLM runs int8 W8A8 experts (channel weight scales, dynamic per-token activations) and int4
W4A16 experts on x86 with ``CPUExpertsInt8`` / ``CPUExpertsInt4``, which call
``fused_experts_cpu`` and ask for AMX, and only with the router weights on the output. Its
oracles (``select_int8_moe_backend``, ``select_wna16_moe_backend``, called by the quantized
MoE method when the layer is built) raise everywhere else. The classes here are vLLM modular
experts: vLLM's runner routes with our router and hands the ids and weights to ``apply``,
as with vLLM's classes.

* AVX-512-BF16 without AMX (Zen 4): ``fused_experts_cpu`` is in the ``_C`` build vLLM loads
  there, and runs without AMX: its small-batch path is AVX-512 VNNI code, its large-batch path
  oneDNN's brgemm, which picks AVX-512 VNNI where AMX is missing; the weight layout
  (``convert_weight_packed``, VNNI with s8s8 compensation) is the same for both. AMX is only
  vLLM's device check (tests run it with oneDNN capped at AVX-512-BF16 and no AMX permission
  for the process). :class:`FusedInt8Experts` is ``CPUExpertsInt8`` with that check; int4 gets
  vLLM's own ``CPUExpertsInt4``, picked here where that check is all that excludes it
  (``make_wna16_moe_kernel`` accepts no other class).
* AVX2 (and fp32 runs anywhere: ``fused_experts_cpu`` computes in bf16/fp16 only):
  :class:`OneDnnInt8Experts` runs each expert a batch touches as two of vLLM's oneDNN int8
  GEMMs (``onednn_scaled_mm``, the kernel of vLLM's CPU int8 linears), activations quantized
  per row before each, as ``CPUExpertsInt8`` does. oneDNN is in every x86 build. AVX2 has no
  int4 MoE kernel (``_C_AVX2`` lacks ``fused_experts_cpu`` and ``cpu_gemm_wna16``).
* Router weights on the input (Llama 4, one expert per row): vLLM's prepare step has already
  scaled the rows, so our int8 classes combine with unit weights (vLLM's refuse such layers at
  their first forward).

:func:`cpu_experts_fallback` puts these behind vLLM's own choice while a layer is built.
"""

from __future__ import annotations

import itertools
import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch

import vllm.model_executor.layers.fused_moe.modular_kernel as mk
from vllm import _custom_ops as ops
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUExpertsInt4, CPUExpertsInt8
from vllm.model_executor.layers.fused_moe.topk_weight_and_reduce import TopKWeightAndReduceNoOP
from vllm.model_executor.layers.quantization.utils.quant_utils import (
    QuantKey,
    kInt8DynamicTokenSym,
    kInt8StaticChannelSym,
)
from vllm.platforms import CpuArchEnum, current_platform
from vllm.utils.torch_utils import direct_register_custom_op

#: ``VLLM_LAGUNA_CPU_INT8_EXPERTS=onednn`` runs int8 experts on :class:`OneDnnInt8Experts`
#: on any x86 CPU (the AVX2 path, measurable and testable on AVX-512 and AMX machines too);
#: the default ``auto`` takes vLLM's kernel where it has one
INT8_EXPERTS_ENV = "VLLM_LAGUNA_CPU_INT8_EXPERTS"
INT8_EXPERTS_CHOICES = ("auto", "onednn")


def forced_int8_experts() -> str:
    choice = os.environ.get(INT8_EXPERTS_ENV, "auto").strip() or "auto"
    if choice not in INT8_EXPERTS_CHOICES:
        raise ValueError(f"{INT8_EXPERTS_ENV}={choice!r}: expected one of {', '.join(INT8_EXPERTS_CHOICES)}")
    return choice


class OneDnnInt8Experts(mk.FusedMoEExpertsModular):
    """Experts ``w13`` ``[E, 2I, H]`` and ``w2`` ``[E, H, I]`` int8 with per-output-channel
    fp32 scales, each expert held by two oneDNN int8 GEMM handlers (which keep their own
    packed copy of the weight; the layer's int8 tensors are released).

    A step gathers the rows routed to each touched expert, computes
    ``down(silu(gate) * up)`` with both GEMMs in int8 (activations quantized per row), and
    adds ``weight * out`` into an fp32 sum per token, cast to the output dtype once."""

    @property
    def expects_unquantized_inputs(self) -> bool:
        return True

    @staticmethod
    def activation_format() -> mk.FusedMoEActivationFormat:
        return mk.FusedMoEActivationFormat.Standard

    @staticmethod
    def _supports_current_device() -> bool:
        return current_platform.is_cpu() and current_platform.get_cpu_architecture() == CpuArchEnum.X86

    @staticmethod
    def _supports_no_act_and_mul() -> bool:
        return False

    @staticmethod
    def _supports_activation(activation: MoEActivation) -> bool:
        return activation == MoEActivation.SILU

    @staticmethod
    def _supports_parallel_config(moe_parallel_config: FusedMoEParallelConfig) -> bool:
        return not moe_parallel_config.use_all2all_kernels

    @staticmethod
    def _supports_quant_scheme(weight_key: QuantKey | None, activation_key: QuantKey | None) -> bool:
        return (weight_key, activation_key) == (kInt8StaticChannelSym, kInt8DynamicTokenSym)

    @staticmethod
    def _supports_routing_method(
        routing_method: RoutingMethodType, weight_key: QuantKey | None, activation_key: QuantKey | None
    ) -> bool:
        return True  # the router's ids and weights arrive computed; the label picks nothing here

    @staticmethod
    def _supports_router_logits_dtype(router_logits_dtype: torch.dtype | None, routing_method) -> bool:
        return True

    def supports_expert_map(self) -> bool:
        return False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """One handler pair per expert, from ``w13_weight``/``w2_weight`` and their
        ``*_weight_scale`` ``[E, N, 1]``; the int8 tensors are then replaced by empty ones."""
        dtype = self.moe_config.in_dtype
        self.hidden_size = layer.w13_weight.shape[2]
        self.intermediate_size = layer.w2_weight.shape[2]

        def handlers(weight: torch.Tensor, scale: torch.Tensor) -> list:
            return [
                ops.create_onednn_scaled_mm(weight[e].t(), scale[e].reshape(-1).float(), dtype, True, False, 32)
                for e in range(weight.shape[0])
            ]

        self.registry_key = next(_next_key)
        _ONEDNN_EXPERTS[self.registry_key] = self
        self.gate_up = handlers(layer.w13_weight.data, layer.w13_weight_scale.data)
        self.down = handlers(layer.w2_weight.data, layer.w2_weight_scale.data)
        num_experts = layer.w13_weight.shape[0]
        for name in ("w13_weight", "w2_weight"):
            getattr(layer, name).data = torch.empty(num_experts, 0, 0, dtype=torch.int8)

    def moe_problem_size(
        self, a1: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor
    ) -> tuple[int, int, int, int, int]:
        # the layer's weights are released (the handlers hold them): shapes from the config
        return len(self.gate_up), a1.size(0), 2 * self.intermediate_size, a1.size(-1), topk_ids.size(1)

    def workspace_shapes(self, M, N, K, topk, global_num_experts, local_num_experts, expert_tokens_meta, activation):
        return (0,), (0,), (M, K)

    def finalize_weight_and_reduce_impl(self) -> mk.TopKWeightAndReduce:
        return TopKWeightAndReduceNoOP()

    @staticmethod
    def _quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of ``x`` ``[M, K]`` to int8 with one fp32 scale each: ``([M, K], [M, 1])``."""
        x_q, x_scale, _ = ops.onednn_scaled_int8_quant(x.contiguous(), None, None, True)
        return x_q, x_scale

    @staticmethod
    def _int8_gemm(handler, x_q: torch.Tensor, x_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """int8 rows ``x_q`` ``[M, K]`` with scales ``[M, 1]`` times the handler's int8 ``[K, N]``
        weight, rescaled: ``[M, N]`` in ``dtype``."""
        out = torch.empty(x_q.size(0), handler.n, dtype=dtype)
        return ops.onednn_scaled_mm(handler, x_q.contiguous(), out, x_scale.contiguous(), None, None, None)

    def apply(
        self,
        output: torch.Tensor,
        hidden_states: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        activation: MoEActivation,
        global_num_experts: int,
        expert_map: torch.Tensor | None,
        a1q_scale: torch.Tensor | None,
        a2_scale: torch.Tensor | None,
        workspace13: torch.Tensor,
        workspace2: torch.Tensor,
        expert_tokens_meta: mk.ExpertTokensMetadata | None,
        apply_router_weight_on_input: bool,
    ) -> None:
        """The experts' work runs in :func:`laguna_onednn_int8_experts`, an op torch.compile
        leaves opaque (vLLM traces the MoE runner on CPU; the loop over the touched experts
        depends on the routing's values)."""
        weights = _unit_weights_if_on_input(topk_weights, apply_router_weight_on_input)
        torch.ops.vllm.laguna_onednn_int8_experts(output, hidden_states, weights, topk_ids, self.registry_key)

    def run(self, output: torch.Tensor, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor):
        top_k = topk_ids.size(1)
        choices = topk_ids.reshape(-1)
        weights = topk_weights.reshape(-1, 1).float()
        order = torch.argsort(choices, stable=True)
        counts = torch.bincount(choices, minlength=len(self.gate_up)).tolist()
        total = torch.zeros(hidden_states.size(0), self.hidden_size, dtype=torch.float32)
        x_q, x_scale = self._quantize(hidden_states)  # per token: the same for every expert
        dtype = hidden_states.dtype
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            picks = order[start : start + count]
            start += count
            tokens = picks // top_k
            gate_up = self._int8_gemm(self.gate_up[expert], x_q[tokens], x_scale[tokens], dtype)
            hidden = torch.empty(count, self.intermediate_size, dtype=dtype)
            torch.ops._C.silu_and_mul(hidden, gate_up)
            out = self._int8_gemm(self.down[expert], *self._quantize(hidden), dtype)
            total.index_add_(0, tokens, out.float() * weights[picks])
        output.copy_(total)


#: the live :class:`OneDnnInt8Experts` by key, for the op (which takes plain values only)
_ONEDNN_EXPERTS: weakref.WeakValueDictionary[int, OneDnnInt8Experts] = weakref.WeakValueDictionary()
_next_key = itertools.count()


def laguna_onednn_int8_experts(
    output: torch.Tensor, hidden_states: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, key: int
) -> None:
    _ONEDNN_EXPERTS[key].run(output, hidden_states, topk_weights, topk_ids)


def _laguna_onednn_int8_experts_fake(output, hidden_states, topk_weights, topk_ids, key) -> None:
    return None


direct_register_custom_op(
    op_name="laguna_onednn_int8_experts",
    op_func=laguna_onednn_int8_experts,
    mutates_args=["output"],
    fake_impl=_laguna_onednn_int8_experts_fake,
)


def has_fused_experts_kernel() -> bool:
    """vLLM's ``fused_experts_cpu`` is in the kernel build it loaded: ``_C``, which vLLM loads
    on x86 CPUs with AVX-512 and AVX512-BF16, AMX or not."""
    import vllm._custom_ops  # noqa: F401  (loads the build)

    return current_platform.is_cpu() and hasattr(torch.ops._C, "fused_experts_cpu")


def _unit_weights_if_on_input(topk_weights: torch.Tensor, on_input: bool) -> torch.Tensor:
    """The combine weights of a layer whose router weights went on the input (vLLM's prepare
    step scaled the rows: one expert per row): ones."""
    return torch.ones_like(topk_weights) if on_input else topk_weights


class FusedInt8Experts(CPUExpertsInt8):
    """vLLM's ``CPUExpertsInt8`` (``fused_experts_cpu``, VNNI-packed weights) wherever the
    kernel is built in (AMX or AVX-512-BF16), with router weights on the input taken as unit
    combine weights. vLLM keeps its own class where it runs (AMX, weights on the output)."""

    @staticmethod
    def _supports_current_device() -> bool:
        return has_fused_experts_kernel()

    @staticmethod
    def _supports_routing_method(routing_method, weight_key, activation_key) -> bool:
        return True  # the router's ids and weights arrive computed; the label picks nothing here

    @staticmethod
    def is_supported_config(cls, moe_config: FusedMoEConfig, weight_key, activation_key, activation_format):
        """``CPUExpertsInt8``'s checks, and bf16/fp16 activations: ``fused_experts_cpu``
        computes in those only (vLLM's class does not check it and fails at the first forward)."""
        if moe_config.in_dtype not in (torch.bfloat16, torch.float16):
            return False, "fused_experts_cpu computes in bfloat16/float16 only"
        return CPUExpertsInt8.is_supported_config(cls, moe_config, weight_key, activation_key, activation_format)

    def apply(self, *, topk_weights: torch.Tensor, apply_router_weight_on_input: bool, **kwargs) -> None:
        """``CPUExpertsInt8.apply`` (vLLM's kernel calls it with keywords), with unit combine
        weights where the router weights went on the input."""
        weights = _unit_weights_if_on_input(topk_weights, apply_router_weight_on_input)
        super().apply(topk_weights=weights, apply_router_weight_on_input=False, **kwargs)


class _Int4DeviceCheck(CPUExpertsInt4):
    """``CPUExpertsInt4``'s support check with the device check of :class:`FusedInt8Experts`
    (only consulted: vLLM builds int4 CPU experts from its own class alone)."""

    @staticmethod
    def _supports_current_device() -> bool:
        return has_fused_experts_kernel()


#: our int8 experts classes, in the order they are tried where vLLM's class does not take a layer
INT8_EXPERTS_CLASSES: tuple[type[mk.FusedMoEExperts], ...] = (FusedInt8Experts, OneDnnInt8Experts)


def _supported(cls, config: FusedMoEConfig, weight_key, activation_key) -> bool:
    return cls.is_supported_config(cls, config, weight_key, activation_key, mk.FusedMoEActivationFormat.Standard)[0]


@contextmanager
def cpu_experts_fallback(router_weights_on_input: bool) -> Iterator[None]:
    """While a fused-MoE layer is built, on the CPU backend:

    * int8 (compressed-tensors' MoE method): vLLM's class where it takes the layer (bf16/fp16,
      weights on the output); else the first of :data:`INT8_EXPERTS_CLASSES` that does; :data:`INT8_EXPERTS_ENV` ``=onednn`` picks
      :class:`OneDnnInt8Experts` on any x86 CPU.
    * int4 (vLLM's WNA16 MoE methods: compressed-tensors, AWQ, GPTQ): where vLLM finds nothing
      and ``CPUExpertsInt4`` is excluded only by its AMX check, ``CPUExpertsInt4``.

    For the CPU backend only (``layers/experts.py`` enters it there)."""
    from vllm.model_executor.layers.fused_moe.oracle.int8 import Int8MoeBackend
    from vllm.model_executor.layers.fused_moe.oracle.int_wna16 import (
        WNA16MoEBackend,
        _backend_incompatibility_reason,
    )
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_w8a8_int8 as int8_method,
    )
    from vllm.model_executor.layers.quantization import auto_awq, auto_gptq, moe_wna16
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import (
        compressed_tensors_moe_wna16,
    )

    wna16_methods = (compressed_tensors_moe_wna16, auto_awq, auto_gptq, moe_wna16)  # each imports the oracle
    vllm_int8, vllm_wna16 = int8_method.select_int8_moe_backend, compressed_tensors_moe_wna16.select_wna16_moe_backend
    forced = forced_int8_experts()

    def select_int8(config, weight_key=kInt8StaticChannelSym, activation_key=kInt8DynamicTokenSym):
        ours = INT8_EXPERTS_CLASSES
        if forced == "onednn":
            ours = (OneDnnInt8Experts,)
        elif not router_weights_on_input and config.in_dtype != torch.float32:
            # vLLM's class takes fp32 layers it cannot run: only bf16/fp16 ones go to vLLM
            try:
                return vllm_int8(config, weight_key, activation_key)
            except NotImplementedError:
                pass
        for cls in ours:
            if _supported(cls, config, weight_key, activation_key):
                return Int8MoeBackend.CPU, cls
        return vllm_int8(config, weight_key, activation_key)  # raises, with vLLM's reasons

    def select_wna16(config, weight_key, quant_config, may_have_zp, may_have_bias, allow_tile_padding=False):
        try:
            return vllm_wna16(config, weight_key, quant_config, may_have_zp, may_have_bias, allow_tile_padding)
        except (NotImplementedError, ValueError):
            excluded = _backend_incompatibility_reason(
                WNA16MoEBackend.CPU, config, quant_config, may_have_zp, may_have_bias, allow_tile_padding
            )
            if excluded is not None or not _supported(_Int4DeviceCheck, config, weight_key, None):
                raise
        return WNA16MoEBackend.CPU, CPUExpertsInt4

    int8_method.select_int8_moe_backend = select_int8
    for module in wna16_methods:
        module.select_wna16_moe_backend = select_wna16
    try:
        yield
    finally:
        int8_method.select_int8_moe_backend = vllm_int8
        for module in wna16_methods:
            module.select_wna16_moe_backend = vllm_wna16
