"""What this CPU can do at best, to bound the figures of ``cpu.py``:

    python benchmarks/machine.py              # all usable cores
    python benchmarks/machine.py --threads 1

* **read bandwidth**: ``torch.sum`` over 256 MiB of fp32 (GB/s). A batch-1 decode step reads
  every weight it uses once, so (bytes read a token) / (this) is the fastest a step can be.
* **fp32 GEMM**: ``torch.mm`` of two 2048 x 2048 fp32 matrices (GFLOP/s, torch's BLAS). On an
  AVX2 CPU, bf16 has no faster arithmetic (no bf16 FMA), so a prefill or a batch-32 step cannot
  beat (its FLOPs) / (this).
* **bf16 GEMV**: ``F.linear`` of one bf16 row by a 32768 x 512 bf16 weight, a benchmark LM head
  (GB/s of weight read): what torch's own batch-1 linear reaches against the bandwidth above.

Medians of 7 timed calls after warm-up (``kernels.py``'s timer); the machine should be quiet.
"""

from __future__ import annotations

import argparse
import os

import torch
from kernels import Timer  # benchmarks/kernels.py: medians of timed calls

TIMER = Timer(torch.device("cpu"), calls=1, repeats=7)


def median_seconds(fn) -> float:
    fn()  # a second warm-up call beside the Timer's own
    return TIMER.eager(fn) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    big = torch.randn(64 * 2**20)
    read_gb_s = big.numel() * 4 / median_seconds(big.sum) / 1e9

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gemm_gflop_s = 2 * 2048**3 / median_seconds(lambda: a @ b) / 1e9

    row = torch.randn(1, 512, dtype=torch.bfloat16)
    head = (torch.randn(32768, 512) * 0.05).to(torch.bfloat16)
    gemv_gb_s = head.numel() * 2 / median_seconds(lambda: torch.nn.functional.linear(row, head)) / 1e9

    print(f"threads {args.threads}: read bandwidth {read_gb_s:.1f} GB/s (fp32 sum, 256 MiB), "
          f"fp32 GEMM {gemm_gflop_s:.0f} GFLOP/s (2048^3), "
          f"bf16 GEMV {gemv_gb_s:.1f} GB/s of weight (1 x 512 by 32768 x 512)")  # fmt: skip


if __name__ == "__main__":
    main()
