"""bf16 linears on CPUs without a bf16 matmul: fp32 GEMMs over bf16 values.

vLLM's CPU backend runs an unquantized linear through oneDNN (``onednn_mm``, or AMX's
packed kernel for small weights). On an x86 CPU without AVX-512/AMX, oneDNN cannot build a
bf16 matmul and vLLM falls back to ``torch.nn.functional.linear``, whose bf16 kernel on
AVX2 converts element by element: measured on an AVX2 EPYC (1 thread, CPU time), 3-6x
slower than oneDNN's fp32 GEMM on 8-32 rows for every projection of the benchmark
checkpoint; on one row its GEMV is about as fast as the fp32 ones (it reads half the
bytes), and oneDNN's fp32 GEMV is 1.5x slower on the LM head.

:func:`use_fp32_gemms_for_bf16` therefore re-dispatches such layers to fp32 GEMMs over an
fp32 copy of the bf16 weight (activations widened to fp32, the result rounded to bf16 once):

* outputs of at least :data:`MIN_OUTPUT_FEATURES`: vLLM's own fp32 oneDNN handler for two
  rows and more, torch's bf16 GEMV for one row (:func:`bf16_linear_fp32_onednn`);
* narrower outputs (per-head attention gates, MoE routers), where a oneDNN call costs more
  than the product: torch's fp32 GEMM at every row count, in plain aten ops that vLLM's
  compiled graph fuses with their neighbours. On 4096 prompt rows a [512 -> 64] router
  took 18.5 ms in torch's bf16 kernel and 3.1 ms in fp32; at one row, in the compiled graph,
  they are level (eager: ~5 us more a call in fp32).

bf16 x bf16 products are exact in fp32 and torch's bf16 kernel also accumulates in fp32, so
both are the same math up to summation order. fp32 models, quantized layers and CPUs whose
oneDNN has bf16 are left alone. The price is memory: the fp32 copy beside the bf16 weight,
3x the bytes of these layers (the fused-MoE experts, the bulk of an MoE checkpoint, keep
vLLM's bf16 kernel, which is fast on AVX2). Where the copies would not fit beside vLLM's KV
cache (:data:`MAX_SHARE_OF_AVAILABLE_MEMORY`), the layers keep vLLM's dispatch (what in-tree
runs) instead of crowding out the KV cache on a machine short of memory.
"""

from __future__ import annotations

import functools

import psutil
import torch
import torch.nn.functional as F
from torch import nn

from vllm import _custom_ops as ops
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, UnquantizedEmbeddingMethod
from vllm.platforms import current_platform
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_laguna.kernels.dispatch import LIBRARY

#: Output widths below this take torch's fp32 GEMM instead of oneDNN's: per-head gates and
#: routers, where a oneDNN call costs more than the product (16 x 512 is 3-6x slower in oneDNN).
MIN_OUTPUT_FEATURES = 128

#: The fp32 copies may take at most this share of the memory that is available when the
#: weights are loaded (a parallel engine's rank: its part of it), less an explicitly sized KV
#: cache (``VLLM_CPU_KVCACHE_SPACE``), which vLLM allocates afterwards. The rest is headroom
#: for activations and vLLM's own use.
MAX_SHARE_OF_AVAILABLE_MEMORY = 0.5

logger = init_logger(__name__)


@functools.cache
def onednn_has_bf16_matmul() -> bool:
    """Whether vLLM's oneDNN handler accepts bf16 weights on this CPU (vLLM's own test)."""
    if not ops._supports_onednn:
        return False
    try:
        ops.create_onednn_mm(torch.zeros(32, 32, dtype=torch.bfloat16), 1)
    except RuntimeError:
        return False
    return True


def _eligible(module: nn.Module) -> bool:
    method = getattr(module, "quant_method", None)
    weight = getattr(module, "weight", None)
    return (
        isinstance(module, (LinearBase, ParallelLMHead))
        and type(method) in (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)
        and isinstance(weight, torch.Tensor)
        and weight.dtype == torch.bfloat16
        and weight.dim() == 2
    )


def bf16_linear_fp32_onednn(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handler: torch.Tensor, n: int
) -> torch.Tensor:
    """``x [M, K] bf16 @ weight [N, K]^T (+ bias)`` -> ``[M, N]`` bf16.

    One row: torch's bf16 GEMV (``weight``), which reads half the bytes of an fp32 one.
    More rows: vLLM's oneDNN fp32 GEMM (``handler``, an fp32 copy of ``weight`` packed by
    oneDNN) over the widened activations. A library op so that the row-count branch runs
    at call time under torch.compile instead of becoming a guard. Registered with vLLM's
    ``direct_register_custom_op`` (a plain CPU kernel), not ``torch.library.custom_op``,
    whose Python dispatch cost about 50 us a call: at one row, 33 calls a decode step
    made the plugin's Llama 4 step ~2 ms slower than vLLM in-tree's plain ``F.linear``.
    """
    if x.shape[0] == 1:
        return torch.nn.functional.linear(x, weight, bias)
    out = torch.empty((x.shape[0], n), dtype=torch.float32, device=x.device)
    torch.ops._C.onednn_mm(out, x.float(), None if bias is None else bias.float(), handler)
    return out.to(x.dtype)


def _bf16_linear_fp32_onednn_fake(x, weight, bias, handler, n):
    return x.new_empty((x.shape[0], n))


direct_register_custom_op(
    "bf16_linear_fp32_onednn",
    bf16_linear_fp32_onednn,
    fake_impl=_bf16_linear_fp32_onednn_fake,
    target_lib=LIBRARY,
    dispatch_key="CPU",
)


def _fp32_onednn_linear(weight: torch.Tensor):
    """``weight`` is the layer's plain tensor (``.data``), shared with the parameter."""
    dnnl = ops.create_onednn_mm(weight.float().t(), 32)

    def linear(x: torch.Tensor, _parameter: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The op gets the plain tensor, not vLLM's parameter subclass, whose
        # ``__torch_function__`` costs 4-9 us a call (one-row step: 33 calls).
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.vllm_laguna.bf16_linear_fp32_onednn(flat, weight, bias, dnnl.handler_tensor, dnnl.n)
        return out.view(*x.shape[:-1], dnnl.n)

    # the handler releases oneDNN's copy when it is collected: keep it with the closure
    linear.dnnl = dnnl
    return linear


def _fp32_torch_linear(weight: torch.Tensor):
    """A narrow layer's linear: torch's fp32 GEMM over an fp32 copy of ``weight`` (plain aten
    ops, no library op, so no opaque node in vLLM's compiled graph at any row count)."""
    weight32 = weight.float()

    def linear(x: torch.Tensor, _parameter: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x.float(), weight32, None if bias is None else bias.float()).to(x.dtype)

    linear.weight32 = weight32
    return linear


def _memory_left_for_copies() -> int:
    """This rank's part of the memory available now (a tensor- or pipeline-parallel engine's
    ranks load side by side on one machine), less the KV cache it allocates afterwards when
    its size is explicit."""
    config = get_current_vllm_config()
    share = psutil.virtual_memory().available // config.parallel_config.world_size
    return share - (config.cache_config.kv_cache_memory_bytes or 0)


def use_fp32_gemms_for_bf16(model: nn.Module) -> int:
    """Re-dispatches the bf16 linears of ``model`` (run after vLLM's own dispatch, from the
    model's ``process_weights_after_loading``); returns how many layers it changed."""
    if not current_platform.is_cpu() or onednn_has_bf16_matmul() or not ops._supports_onednn:
        return 0
    layers = [module for module in model.modules() if _eligible(module)]
    if not layers:  # fp32 or quantized: nothing to copy, no memory to weigh
        return 0
    needed = sum(4 * module.weight.numel() for module in layers)
    left = _memory_left_for_copies()
    if needed > MAX_SHARE_OF_AVAILABLE_MEMORY * left:
        logger.warning(
            "vllm-laguna: the bf16 linears keep torch's bf16 kernel, which this CPU runs 3-6x slower "
            "than fp32 GEMMs from 2 rows on (prompts, batches): the fp32 copies those need "
            "(%.2f GiB) are more than %d%% of the memory left beside the KV cache (%.2f GiB). "
            "Free memory or lower VLLM_CPU_KVCACHE_SPACE to get them.",
            needed / 2**30, round(100 * MAX_SHARE_OF_AVAILABLE_MEMORY), left / 2**30,
        )  # fmt: skip
        return 0
    for module in layers:
        wide = module.weight.shape[0] >= MIN_OUTPUT_FEATURES
        module.cpu_linear = (_fp32_onednn_linear if wide else _fp32_torch_linear)(module.weight.data)
    return len(layers)
