"""Run code as on an AVX-512-BF16 CPU without AMX (AMD Zen 4), on an AMX machine.

An AMX CPU runs AMX tile instructions only for a process that asked Linux for them
(``arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)``); without that permission each one kills
the process (SIGILL), as on a CPU that lacks them. Three things ask or decide on this CPU:

* oneDNN (torch's and the one in vLLM's ``_C``) asks for the permission when its ISA reaches
  AMX: ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` caps it at Zen 4's level, where its brgemm and
  matmul kernels are AVX-512 (VNNI, BF16) code;
* vLLM and torch's Inductor choose AMX paths from ``torch.cpu._is_amx_tile_supported()`` (and
  its C binding), which :func:`hide_amx` makes answer False before either is imported;
* nothing else in the process asks for the permission, which :func:`amx_permitted` checks
  at the end: had anything been granted it, the run would not show what a Zen 4 does.

``python tests/avx512_emulation.py OUT.json SCHEME=QUANTIZED=TWIN=BOUNDS ...`` runs each
checkpoint in bf16 with the harness and writes the experts class, the gaps against the twin
(and any breach of ``harness.BOUNDS``) and whether AMX was permitted to ``OUT.json``.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys

#: oneDNN's ISA cap for this emulation (``ONEDNN_MAX_CPU_ISA``)
ONEDNN_ISA_CAP = "AVX512_CORE_BF16"
ARCH_GET_XCOMP_PERM = 0x1022
SYS_ARCH_PRCTL = 158  # x86-64
XFEATURE_XTILEDATA = 18


def emulation_env(env: dict[str, str]) -> dict[str, str]:
    return env | {"ONEDNN_MAX_CPU_ISA": ONEDNN_ISA_CAP, "DNNL_MAX_CPU_ISA": ONEDNN_ISA_CAP}


def hide_amx() -> None:
    import torch

    torch.cpu._is_amx_tile_supported = lambda: False
    torch._C._cpu._is_amx_tile_supported = lambda: False


def amx_permitted() -> bool:
    """Whether this process may run AMX tile instructions (Linux's XCOMP permission)."""
    mask = ctypes.c_uint64(0)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_PERM, ctypes.byref(mask)) != 0:
        raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_GET_XCOMP_PERM)")
    return bool(mask.value & (1 << XFEATURE_XTILEDATA))


def main(out: str, runs: list[str]) -> None:
    assert os.environ.get("ONEDNN_MAX_CPU_ISA") == ONEDNN_ISA_CAP, "run with emulation_env()"
    hide_amx()
    from harness import BF16, INT8_W8A8, low_precision_gaps, prompts_for, vllm_run

    prompts = prompts_for(512, [5, 9, 12, 17, 23, 28, 33, 40, 45, 50, 64, 70], seed=5)

    def kernel(model):
        method = model.model.layers[1].mlp.experts.routed_experts.quant_method
        return method.experts_cls.__name__

    report = {}
    for run in runs:
        scheme, quantized, twin, bounds = run.split("=")
        results, seen = vllm_run(
            quantized, prompts, max_new_tokens=24, dtype="bfloat16", inspect=kernel, prompt_logprobs=True
        )
        gaps = low_precision_gaps(twin, prompts, results)
        try:
            gaps.assert_within({"BF16": BF16, "INT8_W8A8": INT8_W8A8}[bounds])
            outside = None
        except AssertionError as error:
            outside = str(error)
        report[scheme] = {"kernel": seen, "gaps": gaps.describe(), "outside": outside}
    report["amx_permitted"] = amx_permitted()
    with open(out, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
