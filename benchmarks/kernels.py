"""Times the fused kernels against their torch references and vLLM's own fused routing ops.

Router: Laguna routing (sigmoid, selection bias, renormalise, x2.5) for T tokens and
(experts, k) in {(256, 8), (256, 16), (128, 1)}; fp32 logits as Laguna's router computes them.
Compared: the unfused torch reference (eager), the same under ``torch.compile``, our Triton
kernel, and on CUDA vLLM 0.32's fused ops for this routing: ``fused_topk_bias`` with
``scoring_func="sigmoid"`` (the ``_moe_C.topk_sigmoid`` kernel) and ``ops.grouped_topk`` with
one group (``_moe_C.grouped_topk``). Neither has a soft-cap, so the benchmark uses none.

Gated output: ``attn * softplus(gate)`` in bf16 at Laguna-XS.2's shapes (48 and 64 heads x
128, per-head gate) and Laguna-M.1's (64 x 128, per-element gate), one tensor-parallel rank.

Two timings per cell on CUDA, both with warm caches: ``eager`` is the wall time per call of
back-to-back calls (what an un-captured step pays, launch overhead included) and ``graph``
the GPU time per call replayed from a CUDA graph (what vLLM's captured decode steps pay).
On CPU only the torch rows run (``eager``), unless ``TRITON_INTERPRET=1`` puts the Triton
and vLLM rows through the interpreter to check the script end to end (meaningless times; the
vLLM ops do not exist there and show as n/a). The Triton columns are checked against the
reference on the same device: ids identical, outputs' bitwise-equal fraction.

    python benchmarks/kernels.py                        # CUDA: full grid, table, JSON
    python benchmarks/kernels.py --device cpu --quick   # CPU smoke run (torch rows only)
    TRITON_INTERPRET=1 python benchmarks/kernels.py --device cpu --quick --calls 1 --repeats 1
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vllm_laguna import kernels
from vllm_laguna.kernels import dispatch
from vllm_laguna.kernels.gated_output import softplus_gate_reference
from vllm_laguna.kernels.sigmoid_topk import sigmoid_topk_reference

TOKENS = (1, 8, 64, 512, 4096, 16384)
QUICK_TOKENS = (1, 64)
ROUTER_SHAPES = ((256, 8), (256, 16), (128, 1))
ROUTED_SCALING_FACTOR = 2.5  # Laguna-XS.2
GATE_SHAPES = {  # name: (heads, head_dim, per_element)
    "XS.2 full 48x128 per-head": (48, 128, False),
    "XS.2 sliding 64x128 per-head": (64, 128, False),
    "M.1 64x128 per-element": (64, 128, True),
}
ROUTER_TARGET_VS_TORCH = 5.0
GATE_TARGET_VS_TORCH = 1.5


class Timer:
    """Per-call times in microseconds, medians over repeated measurements."""

    def __init__(self, device: torch.device, calls: int, repeats: int):
        self.device = device
        self.calls = calls
        self.repeats = repeats

    def eager(self, fn: Callable) -> float:
        fn()
        if self.device.type != "cuda":
            samples = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                for _ in range(self.calls):
                    fn()
                samples.append((time.perf_counter() - start) / self.calls * 1e6)
            return statistics.median(samples)
        torch.cuda.synchronize()
        samples = []
        for _ in range(self.repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(self.calls):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / self.calls * 1e3)
        return statistics.median(samples)

    def graph(self, fn: Callable) -> float | None:
        if self.device.type != "cuda":
            return None
        import triton.testing

        return triton.testing.do_bench_cudagraph(fn, rep=self.calls, return_mode="median") * 1e3


def _vllm_router_impls(top_k: int) -> dict[str, Callable]:
    """vLLM's fused sigmoid + bias routing ops, where this vLLM build has them (CUDA)."""
    impls = {}
    try:
        from vllm.model_executor.layers.fused_moe.router.fused_topk_bias_router import fused_topk_bias

        impls["vllm topk_sigmoid"] = lambda logits, bias: fused_topk_bias(
            logits, logits, "sigmoid", bias, top_k, True, routed_scaling_factor=ROUTED_SCALING_FACTOR
        )
    except ImportError as error:
        print(f"vLLM fused_topk_bias unavailable: {error}")
    try:
        from vllm import _custom_ops as ops

        impls["vllm grouped_topk"] = lambda logits, bias: ops.grouped_topk(
            logits, 1, 1, top_k, True, ROUTED_SCALING_FACTOR, bias, 1
        )
    except ImportError as error:
        print(f"vLLM grouped_topk unavailable: {error}")
    return impls


def _compiled(fn: Callable) -> Callable:
    torch._dynamo.config.recompile_limit = 64
    return torch.compile(fn, fullgraph=True)


def _router_impls(device: torch.device, top_k: int, compile_torch: bool) -> dict[str, Callable]:
    reference = functools.partial(
        sigmoid_topk_reference, top_k=top_k, routed_scaling_factor=ROUTED_SCALING_FACTOR
    )
    impls = {"torch": lambda logits, bias: reference(logits, bias)}
    if compile_torch:
        compiled = _compiled(reference)
        impls["torch.compile"] = lambda logits, bias: compiled(logits, bias)
    if dispatch.use_triton(torch.empty(1, device=device)):
        impls["triton"] = lambda logits, bias: kernels.sigmoid_topk(
            logits, bias, top_k, routed_scaling_factor=ROUTED_SCALING_FACTOR
        )
        impls.update(_vllm_router_impls(top_k))
    return impls


def _gate_impls(device: torch.device, head_dim: int, compile_torch: bool) -> dict[str, Callable]:
    impls = {"torch": lambda attn, gate: softplus_gate_reference(attn, gate, head_dim)}
    if compile_torch:
        compiled = _compiled(functools.partial(softplus_gate_reference, head_dim=head_dim))
        impls["torch.compile"] = lambda attn, gate: compiled(attn, gate)
    if dispatch.use_triton(torch.empty(1, device=device)):
        impls["triton"] = lambda attn, gate: kernels.softplus_gate(attn, gate, head_dim)
    return impls


def _time_all(timer: Timer, impls: dict[str, Callable], args: tuple) -> dict[str, dict]:
    results = {}
    for name, impl in impls.items():
        call = functools.partial(impl, *args)
        try:
            results[name] = {"eager_us": timer.eager(call), "graph_us": timer.graph(call)}
        except Exception as error:  # a vLLM op that rejects the shape, a capture failure
            results[name] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"}
    return results


def bench_router(timer: Timer, device: torch.device, tokens: tuple[int, ...], compile_torch: bool) -> list[dict]:
    rows = []
    for experts, top_k in ROUTER_SHAPES:
        impls = _router_impls(device, top_k, compile_torch)
        for count in tokens:
            generator = torch.Generator(device=device).manual_seed(count)
            logits = torch.randn(count, experts, device=device, generator=generator)
            bias = torch.randn(experts, device=device, generator=generator) * 0.05
            row = {"kernel": "router", "shape": f"E={experts} k={top_k}", "tokens": count}
            row["times"] = _time_all(timer, impls, (logits, bias))
            if "triton" in impls:
                weights, ids = impls["triton"](logits, bias)
                want_weights, want_ids = impls["torch"](logits, bias)
                row["check"] = {
                    "ids_equal": bool(torch.equal(ids, want_ids)),
                    "weights_max_abs_diff": float((weights - want_weights).abs().max()),
                }
            rows.append(row)
    return rows


def bench_gate(timer: Timer, device: torch.device, tokens: tuple[int, ...], compile_torch: bool) -> list[dict]:
    rows = []
    for name, (heads, head_dim, per_element) in GATE_SHAPES.items():
        impls = _gate_impls(device, head_dim, compile_torch)
        for count in tokens:
            generator = torch.Generator(device=device).manual_seed(count)
            attn = torch.randn(count, heads * head_dim, device=device, generator=generator).bfloat16()
            gate_width = heads * head_dim if per_element else heads
            gate = (torch.randn(count, gate_width, device=device, generator=generator) * 4).bfloat16()
            row = {"kernel": "gated output", "shape": name, "tokens": count}
            row["times"] = _time_all(timer, impls, (attn, gate))
            if "triton" in impls:
                got, want = impls["triton"](attn, gate), impls["torch"](attn, gate)
                row["check"] = {
                    "bitwise_equal_fraction": float((got == want).float().mean()),
                    "max_abs_diff": float((got.float() - want.float()).abs().max()),
                }
            rows.append(row)
    return rows


def _best(times: dict, names: list[str], mode: str) -> float | None:
    values = [times[n][mode] for n in names if n in times and times[n].get(mode) is not None]
    return min(values) if values else None


def summarise(rows: list[dict]) -> None:
    """Adds speedups of the Triton kernel and whether each row meets the issue's targets."""
    for row in rows:
        times = row["times"]
        if "triton" not in times or "error" in times["triton"]:
            continue
        summary = {}
        for mode in ("eager_us", "graph_us"):
            ours = times["triton"][mode]
            if ours is None:  # no CUDA graphs off CUDA
                continue
            summary[f"vs_torch_{mode[:-3]}"] = times["torch"][mode] / ours
            vllm = _best(times, ["vllm topk_sigmoid", "vllm grouped_topk"], mode)
            if vllm is not None:
                summary[f"vs_vllm_{mode[:-3]}"] = vllm / ours
        if row["kernel"] == "router":
            summary["meets_target"] = summary["vs_torch_eager"] >= ROUTER_TARGET_VS_TORCH and all(
                summary.get(f"vs_vllm_{m}", 1.0) >= 1.0 for m in ("eager", "graph")
            )
        else:
            summary["meets_target"] = summary["vs_torch_eager"] >= GATE_TARGET_VS_TORCH
        row["summary"] = summary


def _cell(times: dict, name: str) -> str:
    if name not in times:
        return "-"
    result = times[name]
    if "error" in result:
        return "n/a"
    graph = result["graph_us"]
    return f"{result['eager_us']:.1f}" + ("" if graph is None else f" / {graph:.1f}")


def print_table(rows: list[dict]) -> None:
    names = []
    for row in rows:
        names += [n for n in row["times"] if n not in names]
    header = ["kernel", "shape", "T", *names, "x torch", "x vLLM", "target", "check"]
    lines = [header]
    for row in rows:
        summary = row.get("summary", {})
        check = row.get("check", {})
        speed = lambda key: " / ".join(  # noqa: E731
            f"{summary[f'{key}_{mode}']:.1f}" for mode in ("eager", "graph") if f"{key}_{mode}" in summary
        ) or "-"
        check_text = (
            "-"
            if not check
            else ("ids equal" if check.get("ids_equal") else "IDS DIFFER")
            if "ids_equal" in check
            else f"{check['bitwise_equal_fraction'] * 100:.2f}% bitwise"
        )
        lines.append(
            [
                row["kernel"],
                row["shape"],
                str(row["tokens"]),
                *(_cell(row["times"], n) for n in names),
                speed("vs_torch"),
                speed("vs_vllm"),
                {True: "met", False: "MISSED"}.get(summary.get("meets_target"), "-"),
                check_text,
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for index, line in enumerate(lines):
        print(" | ".join(cell.ljust(width) for cell, width in zip(line, widths)))
        if index == 0:
            print("-+-".join("-" * width for width in widths))
    print("cells: eager us / CUDA-graph us per call; speedups: eager / graph")
    for row in rows:
        for name, result in row["times"].items():
            if "error" in result:
                print(f"{row['kernel']} {row['shape']} T={row['tokens']} {name}: {result['error']}")


def _environment(device: torch.device) -> dict:
    info = {"device": platform.processor() or platform.machine(), "torch": torch.__version__}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    for package in ("triton", "vllm"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS} only, fewer repeats")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--calls", type=int, help="calls per measurement (default 100, quick 20)")
    parser.add_argument("--repeats", type=int, help="measurements per cell (default 7, quick 3)")
    parser.add_argument("--json", type=Path, help="where to write results (default: benchmarks/results/)")
    args = parser.parse_args()

    device = torch.device(args.device)
    tokens = QUICK_TOKENS if args.quick else TOKENS
    # Inductor on CPU compiles C++ for minutes: the compiled rows are for GPUs.
    compile_torch = device.type == "cuda" and not args.no_compile
    timer = Timer(device, args.calls or (20 if args.quick else 100), args.repeats or (3 if args.quick else 7))
    environment = _environment(device)
    print(f"{environment}; TRITON path active: {dispatch.use_triton(torch.empty(1, device=device))}")

    rows = bench_router(timer, device, tokens, compile_torch) + bench_gate(timer, device, tokens, compile_torch)
    summarise(rows)
    print_table(rows)

    slug = re.sub(r"[^a-z0-9]+", "-", environment["device"].lower()).strip("-") or device.type
    path = args.json or Path(__file__).parent / "results" / f"kernels-{slug}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "tokens": tokens, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
