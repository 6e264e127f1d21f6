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

* outputs of at least :data:`MIN_OUTPUT_FEATURES` (:func:`wide_bf16_linear`): up to
  :data:`MAX_FP16_ROWS` rows (decode), FBGEMM's GEMM over an fp16 copy (fp32 arithmetic,
  half the bytes of fp32 weights: an AVX2 GEMM at small batches is bound by reading the
  weights); vLLM's own fp32 oneDNN handler for more rows (prompts); torch's bf16 GEMV for one
  row in layers no wider out than in, where it is as fast as FBGEMM's;
* narrower outputs (per-head attention gates, MoE routers), where a oneDNN call costs more
  than the product: torch's fp32 GEMM at every row count, in plain aten ops that vLLM's
  compiled graph fuses with their neighbours. On 4096 prompt rows a [512 -> 64] router
  took 18.5 ms in torch's bf16 kernel and 3.1 ms in fp32; at one row, in the compiled graph,
  they are level (eager: ~5 us more a call in fp32).

bf16 x bf16 products are exact in fp32 and torch's bf16 kernel also accumulates in fp32, so
all are the same math up to summation order (fp16 holds bf16's values but the tiniest,
:func:`fits_fp16_range`). fp32 models, quantized layers and CPUs whose
oneDNN has bf16 are left alone. The price is memory: the fp32 and fp16 copies beside the bf16 weight,
4x the bytes of these layers (the fused-MoE experts, the bulk of an MoE checkpoint, keep
vLLM's bf16 kernel, which is fast on AVX2). Where the copies would not fit beside vLLM's KV
cache (:data:`MAX_SHARE_OF_AVAILABLE_MEMORY`), the layers keep vLLM's dispatch (what in-tree
runs) instead of crowding out the KV cache on a machine short of memory.
"""

from __future__ import annotations

import functools
import weakref
from typing import NamedTuple

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

#: Wide layers take FBGEMM's fp16-weight GEMM up to this many rows (decode batches), where
#: reading half of oneDNN's fp32 bytes wins (8 rows: 1.4-1.7x; 32 rows: 1.1-1.5x); from 64
#: rows on oneDNN's fp32 GEMM is as fast or faster.
MAX_FP16_ROWS = 32

#: Outputs at least this wide (LM heads) stop at :data:`MAX_FP16_ROWS_VOCAB` rows: FBGEMM's fp16
#: kernel computes more slowly than oneDNN's fp32 one, and on these it starts to matter sooner
#: ([32 x 1024] x [1024 -> 32768]: 32.0 ms against oneDNN's 27.2; at 16 rows 17.4 against 20.2).
VOCAB_OUTPUT_FEATURES = 8192
MAX_FP16_ROWS_VOCAB = 16

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


def wide_bf16_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, handler: torch.Tensor, n: int
) -> torch.Tensor:
    """``x [M, K] bf16 @ weight [N, K]^T (+ bias)`` -> ``[M, N]`` bf16, by row count:

    * up to :data:`MAX_FP16_ROWS` rows (LM heads: :data:`MAX_FP16_ROWS_VOCAB`), where the layer
      has one (:func:`_register_fp16_copy`): FBGEMM's fp16-weight GEMM, which reads half the
      bytes of an fp32 one; at one row only for layers wider out than in, where it beats
      torch's bf16 GEMV;
    * one row otherwise: torch's bf16 GEMV (``weight``);
    * more rows: vLLM's oneDNN fp32 GEMM (``handler``, an fp32 copy of ``weight`` packed by
      oneDNN) over the widened activations.

    A library op so that the row-count branch runs at call time under torch.compile instead
    of becoming a guard. Registered with vLLM's ``direct_register_custom_op`` (a plain CPU
    kernel), not ``torch.library.custom_op``, whose Python dispatch cost about 50 us a call:
    at one row, 33 calls a decode step made the plugin's Llama 4 step ~2 ms slower than vLLM
    in-tree's plain ``F.linear``. The fp16 copy is looked up by the weight's address: a
    library op cannot take FBGEMM's packed object, and an index in the compiled graph would
    outlive the process that numbered it (vLLM caches compiled graphs on disk).
    """
    rows = x.shape[0]
    fp16 = _FP16_COPIES.get(weight.data_ptr()) if rows <= MAX_FP16_ROWS else None
    if fp16 is not None and (1 < rows <= fp16.max_rows or (rows == 1 and fp16.at_one_row)):
        out = torch.ops.quantized.linear_dynamic_fp16(x.float(), fp16.packed)
        if bias is not None:
            out += bias.float()
    elif rows == 1:
        return F.linear(x, weight, bias)
    else:
        out = torch.empty((rows, n), dtype=torch.float32, device=x.device)
        torch.ops._C.onednn_mm(out, x.float(), None if bias is None else bias.float(), handler)
    return out.to(x.dtype)


def _wide_bf16_linear_fake(x, weight, bias, handler, n):
    return x.new_empty((x.shape[0], n))


direct_register_custom_op(
    "wide_bf16_linear",
    wide_bf16_linear,
    fake_impl=_wide_bf16_linear_fake,
    target_lib=LIBRARY,
    dispatch_key="CPU",
)


class _Fp16Copy(NamedTuple):
    packed: torch.ScriptObject  # FBGEMM's packed fp16 weight
    at_one_row: bool
    max_rows: int


#: weight address -> its fp16 copy, for the layers alive now (see :func:`wide_bf16_linear`)
_FP16_COPIES: dict[int, _Fp16Copy] = {}


@functools.cache
def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


def fits_fp16_range(weight: torch.Tensor) -> bool:
    """Whether fp16 holds ``weight``'s bf16 values: exactly from 2**-17 to 65504 in magnitude.
    Beyond 65504 it cannot (the layer gets no fp16 copy); below 2**-17 fp16's subnormal steps
    (2**-24) are coarser than bf16's, so such values move by at most 2**-25: ~1e-5 of the
    output's bf16 rounding step, far under the summation-order differences fp32 GEMMs have."""
    return bool(weight.abs().max() <= torch.finfo(torch.float16).max)


def _register_fp16_copy(linear, weight: torch.Tensor) -> None:
    if not fbgemm_available() or not fits_fp16_range(weight):
        return
    out_features, in_features = weight.shape
    max_rows = MAX_FP16_ROWS_VOCAB if out_features >= VOCAB_OUTPUT_FEATURES else MAX_FP16_ROWS
    packed = torch.ops.quantized.linear_prepack_fp16(weight.float(), None)
    copy = _Fp16Copy(packed, out_features > in_features, max_rows)
    key = weight.data_ptr()
    _FP16_COPIES[key] = copy
    # the closure holds ``weight``, so its address is not reused before this runs
    weakref.finalize(linear, lambda: _FP16_COPIES.pop(key, None) if _FP16_COPIES.get(key) is copy else None)
    linear.fp16 = copy


def _wide_linear(weight: torch.Tensor):
    """``weight`` is the layer's plain tensor (``.data``), shared with the parameter."""
    dnnl = ops.create_onednn_mm(weight.float().t(), 32)

    def linear(x: torch.Tensor, _parameter: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The op gets the plain tensor, not vLLM's parameter subclass, whose
        # ``__torch_function__`` costs 4-9 us a call (one-row step: 33 calls).
        flat = x.reshape(-1, x.shape[-1])
        out = torch.ops.vllm_laguna.wide_bf16_linear(flat, weight, bias, dnnl.handler_tensor, dnnl.n)
        return out.view(*x.shape[:-1], dnnl.n)

    # the handler releases oneDNN's copy when it is collected: keep it with the closure
    linear.dnnl = dnnl
    _register_fp16_copy(linear, weight)
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


def _is_wide(module: nn.Module) -> bool:
    return module.weight.shape[0] >= MIN_OUTPUT_FEATURES


def _copy_bytes_per_weight(module: nn.Module) -> int:
    """fp32 (4 bytes), and for wide layers FBGEMM's fp16 (2 bytes) where FBGEMM exists."""
    return 4 + (2 if _is_wide(module) and fbgemm_available() else 0)


def use_fp32_gemms_for_bf16(model: nn.Module) -> int:
    """Re-dispatches the bf16 linears of ``model`` (run after vLLM's own dispatch, from the
    model's ``process_weights_after_loading``); returns how many layers it changed."""
    if not current_platform.is_cpu() or onednn_has_bf16_matmul() or not ops._supports_onednn:
        return 0
    layers = [module for module in model.modules() if _eligible(module)]
    if not layers:  # fp32 or quantized: nothing to copy, no memory to weigh
        return 0
    needed = sum(_copy_bytes_per_weight(module) * module.weight.numel() for module in layers)
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
        module.cpu_linear = (_wide_linear if _is_wide(module) else _fp32_torch_linear)(module.weight.data)
    return len(layers)
