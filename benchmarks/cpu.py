"""CPU speed of this plugin on vLLM's CPU backend against transformers, vLLM in-tree and llama.cpp.

    python benchmarks/cpu.py laguna     # plugin vs transformers `generate`, batch 1, 8, 32, 128+128 tokens
    python benchmarks/cpu.py lfm2       # plugin vs vLLM in-tree (VLLM_PLUGINS=""), batch 1 and 32
    python benchmarks/cpu.py llama4     # plugin vs vLLM in-tree
    python benchmarks/cpu.py laguna --batches 32 --output-len 64 \\
        --llama-cpp /tmp/llama.cpp/build/bin --gguf /tmp/xs2s-bf16.gguf    # + llama.cpp column
    python benchmarks/cpu.py laguna --quant int8 int4 --batches 1 32 --output-len 64 \\
        --llama-cpp DIR --gguf xs2s-q8_0.gguf xs2s-q4_0.gguf   # bf16 / int8 / int4 experts, llama.cpp Q8_0 / Q4_0

Each side runs in its own process (vLLM in-tree needs ``VLLM_PLUGINS=""`` at start-up), the
sides interleaved A B A B for ``--runs`` rounds; each process loads the model once, warms up
and runs every batch size. Per (side, batch): decode tok/s (``B * (out - 1) / (end to end -
last first token)``), TTFT (median over the batch's requests), end-to-end output tok/s and the
process tree's peak RSS during that batch; medians over the runs and the ratios to the plugin
are printed. Prompts come from vLLM's ``RandomDataset`` (token ids, exactly ``--input-len``
each, the same for every side); sampling is greedy with EOS ignored and no detokenisation.
All cores by default: vLLM's workers are bound to them (``VLLM_CPU_OMP_THREADS_BIND``),
transformers gets ``torch.set_num_threads``, llama.cpp ``-t``. vLLM runs in its default process
layout (front end, engine core, worker) unless ``--in-process-engine`` puts it in one process; on a
small machine the layout alone changes batch-1 decode by 1.4-2.2x (``benchmarks/README.md``).

``--quant int8 int4`` (Laguna) adds a plugin side per scheme, ``plugin-int8`` / ``plugin-int4``:
the benchmark checkpoint's routed experts quantized by compressed-tensors' compressors
(:mod:`vllm_laguna.tiny.quantize`, int4 groups of ``--group-size``), run by the same plugin in
bf16; ``int8+linears`` / ``int4+linears`` quantize the attention, dense and shared-expert
linears too (as llama.cpp's Q8_0 / Q4_0 do; the LM head stays bf16 here). Each side's weight bytes (file tensors) and the weight bytes a decode step reads are
printed: every tensor but the embedding table, the routed experts counted for the experts a
step touches with uniform routing (``1 - (1 - k/E)^B`` of them per layer at batch ``B``);
llama.cpp's from its GGUF's tensor table (``gguf`` from llama.cpp's ``gguf-py`` on
``PYTHONPATH``; file size otherwise).

Tokens are checked in the same invocation, so a fast wrong model cannot win:

* **fp32 exact**: each vLLM side, in fp32, decodes the first ``--check-requests`` prompts
  for ``--check-tokens`` tokens; the plugin's tokens must equal transformers' fp32 greedy
  tokens (in-tree models are reported, not required: vLLM's LFM2 is known to differ).
* **bf16 agreement**: the benchmarked (bf16) tokens of those prompts are scored by
  transformers in fp32 along the side's own sequence (a quantized side: on its dequantized
  twin, so the score measures the kernels, not the rounding of the weights): the share of
  steps whose token is the reference's argmax and the share inside its top 5. The
  transformers bf16 side, when it runs, is the calibration (bf16 rounding alone). Every
  plugin side must stay within 5 points of it (or above 90% top-5 without it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIDES_BY_MODEL = {"laguna": ("plugin", "transformers"), "lfm2": ("plugin", "in-tree"), "llama4": ("plugin", "in-tree")}
#: (tiny builder, preset, overrides): the benchmark checkpoints (see vllm_laguna/tiny)
CHECKPOINTS = {
    "laguna": ("laguna", "xs2-scaled", {}),
    # vLLM's in-tree LFM2 reads conv_dim/block_dim, which only the older Hub config form has
    "lfm2": ("lfm2", "lfm2-350m-scaled", {"config_form": "hub"}),
    "llama4": ("llama4", "scout-scaled", {}),
}
VLLM_SIDES = ("plugin", "in-tree")


# ----------------------------------------------------------------------------- workers


class PeakRss:
    """Peak resident memory of this process and its children (vLLM's engine and workers)
    while inside ``with``, read from Linux's per-process high-water mark instead of sampled.

    Entering resets each process's mark (writing 5 to ``/proc/PID/clear_refs``); leaving sums
    their ``VmHWM``: each process's own peak, so an upper bound of the tree's peak. Nothing
    polls, so the measurement takes no CPU (and, in-process, no GIL) from what it times: the
    20 ms ``psutil`` poll it replaces cost 1.7 ms of CPU a poll on the benchmark machine.
    Where a mark cannot be reset, it is the process's peak since it started.
    """

    def __enter__(self) -> PeakRss:
        import psutil

        root = psutil.Process(os.getpid())
        self.pids = [p.pid for p in (root, *root.children(recursive=True))]
        for pid in self.pids:
            try:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            except OSError:
                pass
        return self

    def __exit__(self, *exc) -> None:
        self.peak = sum(_high_water_mark(pid) for pid in self.pids)


def _high_water_mark(pid: int) -> int:
    """``VmHWM`` of a live process, in bytes (0 if it has gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(re.search(r"^VmHWM:\s+(\d+) kB", status, re.M).group(1)) * 1024


def _batch_metrics(batch: int, out_len: int, wall: float, ttfts: list[float], rss: int) -> dict:
    return {
        "decode_tok_s": batch * (out_len - 1) / max(wall - max(ttfts), 1e-9),
        "ttft_ms": statistics.median(ttfts) * 1000,
        "e2e_tok_s": batch * out_len / wall,
        "peak_rss_gib": rss / 2**30,
    }


def run_vllm(args, prompts: list[list[int]]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    dtype = args.worker_dtype
    llm = LLM(
        model=args.model,
        dtype=dtype,
        seed=0,
        max_model_len=args.input_len + max(args.output_len, args.check_tokens) + 16,
        enforce_eager=args.enforce_eager,
        disable_log_stats=False,
        **json.loads(args.vllm_args),
    )
    inputs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    if dtype == "float32":  # the exactness check: first prompts, few tokens
        params = SamplingParams(temperature=0, max_tokens=args.check_tokens, ignore_eos=True, detokenize=False)
        outs = llm.generate(inputs[: args.check_requests], params, use_tqdm=False)
        return {"check_tokens": [list(o.outputs[0].token_ids) for o in outs]}
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True, detokenize=False)
    llm.generate(inputs[: max(args.batches)], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    results = {}
    for batch in args.batches:
        with PeakRss() as rss:
            start = time.perf_counter()
            outs = llm.generate(inputs[:batch], params, use_tqdm=False)
            wall = time.perf_counter() - start
        ttfts = [o.metrics.first_token_latency for o in outs]
        results[str(batch)] = _batch_metrics(batch, args.output_len, wall, ttfts, rss.peak) | {
            "tokens": [list(o.outputs[0].token_ids) for o in outs[: args.check_requests]]
        }
    return results


def run_transformers(args, prompts: list[list[int]]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.worker_dtype)).eval()
    model.generation_config.eos_token_id = None  # vLLM's ignore_eos, without masking EOS

    class StepClock(LogitsProcessor):
        """Called once per generated token, right after that step's forward."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(rows: list[list[int]], new_tokens: int, clock: StepClock | None = None):
        ids = torch.tensor(rows)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
                logits_processor=LogitsProcessorList([clock] if clock else []),
            )
        return out[:, ids.shape[1] :].tolist()

    generate(prompts[: max(args.batches)], 4)
    results = {}
    for batch in args.batches:
        clock = StepClock()
        with PeakRss() as rss:
            start = time.perf_counter()
            tokens = generate(prompts[:batch], args.output_len, clock)
            wall = time.perf_counter() - start
        ttft = clock.times[0] - start
        results[str(batch)] = _batch_metrics(batch, args.output_len, wall, [ttft], rss.peak) | {
            "tokens": tokens[: args.check_requests]
        }
    return results


def worker_main(args) -> None:
    prompts = json.loads(Path(args.prompts).read_text())
    runner = run_transformers if args.worker == "transformers" else run_vllm
    Path(args.worker_out).write_text(json.dumps(runner(args, prompts)))


# ----------------------------------------------------------------------------- llama.cpp


def llama_cpp_side(gguf: str) -> str:
    """A llama.cpp side's name: ``llama.cpp`` and the GGUF's file name stem."""
    return f"llama.cpp {Path(gguf).stem}"


def run_llama_cpp(args, gguf: str) -> dict:
    """``llama-batched-bench`` on ``gguf`` over the same shapes: TTFT = prompt processing of
    the batch, decode = its S_TG, end to end = B * out / T. Its tokens are not checked (the
    tool does not print them)."""
    cmd = [
        str(Path(args.llama_cpp) / "llama-batched-bench"), "-m", gguf, "-t", str(args.threads),
        "-c", str(max(args.batches) * (args.input_len + args.output_len) + 64), "-b", "2048", "-ub", "512",
        "-npp", str(args.input_len), "-ntg", str(args.output_len), "-npl", ",".join(map(str, args.batches)),
        *args.llama_cpp_args.split(),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    text = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)  # its own rusage: ru_maxrss is its peak, in KiB
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak_rss = usage.ru_maxrss * 1024
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    results = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[2].isdigit() and int(cells[2]) in args.batches:
            batch, t_pp, s_tg, t_all = int(cells[2]), float(cells[4]), float(cells[7]), float(cells[8])
            results[str(batch)] = {
                "decode_tok_s": s_tg,
                "ttft_ms": t_pp * 1000,
                "e2e_tok_s": batch * args.output_len / t_all,
                "peak_rss_gib": peak_rss / 2**30,
            }
    return results


# ----------------------------------------------------------------------------- orchestration


def build_checkpoint(args) -> str:
    if args.model_dir:
        return args.model_dir
    builder, preset, overrides = CHECKPOINTS[args.model]
    out = Path(args.cache_dir) / f"{args.model}-{preset}"
    if not (out / "config.json").exists():
        import importlib

        from vllm_laguna.tiny.__main__ import BUILDERS

        module_name, spec_name, builder_name = BUILDERS[builder]
        module = importlib.import_module(module_name)
        getattr(module, builder_name)(out, getattr(module, spec_name).preset(preset), **overrides)
    return str(out)


def side_checkpoints(args) -> dict[str, tuple[str, str]]:
    """vLLM side -> (checkpoint it runs, checkpoint transformers scores its tokens on):
    the benchmark checkpoint, and per ``--quant`` scheme its routed experts quantized
    (written once into the cache, with the dequantized twin as the reference)."""
    from vllm_laguna.tiny.quantize import quantize_checkpoint

    sides = {side: (args.checkpoint, args.checkpoint) for side in VLLM_SIDES}
    for name in args.quant:
        scheme, _, linears = name.partition("+")
        suffix = f"{scheme}-g{args.group_size}" if scheme == "int4" else scheme
        out = Path(f"{args.checkpoint}-{suffix}{'-all' if linears else ''}")
        twin = out.with_name(f"{out.name}-dequantized")
        if not (out / "config.json").exists() or not (twin / "config.json").exists():
            quantize_checkpoint(args.checkpoint, out, twin, scheme=scheme, group_size=args.group_size, linears=bool(linears))
        sides[f"plugin-{name}"] = (str(out), str(twin))
    return sides


# ----------------------------------------------------------------------------- weight bytes


def expected_experts_touched(batch: int, top_k: int, num_experts: int) -> float:
    """Expected share of a layer's experts that ``batch`` tokens route to, routing uniform
    (0 for a model without routed experts)."""
    return 1 - (1 - top_k / num_experts) ** batch if num_experts else 0.0


def safetensors_weight_bytes(model_dir: str) -> dict[str, float]:
    """Bytes of a checkpoint's tensors: ``experts`` (routed experts, scales included),
    ``embedding`` (the input table) and ``other``, with its ``top_k`` and ``num_experts``."""
    from safetensors import safe_open

    config = json.loads((Path(model_dir) / "config.json").read_text())
    groups = {"experts": 0, "embedding": 0, "other": 0}
    for shard in Path(model_dir).glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                size = math.prod(piece.get_shape()) * _DTYPE_BYTES[piece.get_dtype()]
                group = "experts" if ".experts." in name else "embedding" if "embed_tokens" in name else "other"
                groups[group] += size
    text = config.get("text_config", config)  # Llama 4's multimodal form
    num_experts = text.get("num_experts") or text.get("num_local_experts") or 0  # Laguna / Llama 4; LFM2: none
    return groups | {"top_k": text.get("num_experts_per_tok", 0), "num_experts": num_experts}


def gguf_weight_bytes(path: str) -> dict[str, float] | None:
    """The same groups for a GGUF (llama.cpp's ``*_exps`` tensors are the routed experts),
    read with llama.cpp's ``gguf`` package; None if it is not importable."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return None
    reader = GGUFReader(path)
    groups = {"experts": 0, "embedding": 0, "other": 0}
    for tensor in reader.tensors:
        group = "experts" if "_exps" in tensor.name else "embedding" if tensor.name == "token_embd.weight" else "other"
        groups[group] += int(tensor.n_bytes)
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    count = {key: int(reader.fields[f"{arch}.{key}"].parts[-1][0]) for key in ("expert_count", "expert_used_count")}
    return groups | {"top_k": count["expert_used_count"], "num_experts": count["expert_count"]}


def step_bytes(weights: dict[str, float], batch: int) -> float:
    """Weight bytes one decode step of ``batch`` tokens reads (embedding rows neglected)."""
    touched = expected_experts_touched(batch, weights["top_k"], weights["num_experts"])
    return weights["other"] + touched * weights["experts"]


_DTYPE_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8, "I8": 1, "U8": 1, "F8_E4M3": 1}


def make_prompts(model_dir: str, count: int, input_len: int) -> list[list[int]]:
    """vLLM's RandomDataset prompts as token ids, each exactly ``input_len`` long."""
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import RandomDataset

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    requests = RandomDataset(random_seed=0).sample(tokenizer, num_requests=count, input_len=input_len, output_len=1)
    prompts = []
    for request in requests:
        ids = tokenizer(request.prompt, add_special_tokens=False).input_ids or [tokenizer.pad_token_id or 0]
        prompts.append((ids * (input_len // len(ids) + 1))[:input_len])
    return prompts


def side_env(side: str, threads: int, in_process_engine: bool) -> dict:
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}" if threads > 1 else "0")
    if side == "in-tree":
        env["VLLM_PLUGINS"] = ""
    if in_process_engine:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


# vLLM's log prefix, e.g. "(Worker pid=12) ERROR 12-01 13:13:00 [multiproc_executor.py:953] "
_LOG_PREFIX = re.compile(r"^\([^)]*\) (?:ERROR|WARNING|INFO|DEBUG) \S+ \S+ \[[^\]]*\] ?")
_EXCEPTION_LINE = re.compile(r"^[\w.]*(?:Error|Exception|Interrupt|Exit)\b")


class SideFailed(RuntimeError):
    """A side's worker exited with an error (e.g. vLLM in-tree cannot load the checkpoint)."""


def _root_error(log: Path) -> str:
    """The exception line that ends the first traceback in a worker's log (vLLM wraps the
    root cause in later ones, e.g. "Engine core initialization failed"), its log prefix removed."""
    lines = [_LOG_PREFIX.sub("", line) for line in log.read_text(errors="replace").splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    for line in lines[starts[0] + 1 :] if starts else []:
        if _EXCEPTION_LINE.match(line):
            return line.strip()
    return "no traceback in the log"


def spawn(args, side: str, dtype: str, prompts_file: Path, out_file: Path) -> dict:
    cmd = [
        sys.executable, __file__, args.model, "--worker", "transformers" if side == "transformers" else "vllm",
        "--worker-dtype", dtype, "--model-dir", args.side_checkpoints.get(side, (args.checkpoint,))[0],
        "--prompts", str(prompts_file),
        "--worker-out", str(out_file), "--input-len", str(args.input_len), "--output-len", str(args.output_len),
        "--batches", *map(str, args.batches), "--threads", str(args.threads),
        "--check-requests", str(args.check_requests), "--check-tokens", str(args.check_tokens),
        "--vllm-args", args.vllm_args,
    ] + (["--enforce-eager"] if args.enforce_eager else [])  # fmt: skip
    log = out_file.with_suffix(".log")
    with open(log, "w") as sink:
        rc = subprocess.call(cmd, env=side_env(side, args.threads, args.in_process_engine), stdout=sink, stderr=subprocess.STDOUT)
    if rc:
        raise SideFailed(f"{side} ({dtype}) failed with exit code {rc}: {_root_error(log)}; log: {log}")
    return json.loads(out_file.read_text())


def reference_check(args, prompts: list[list[int]], runs: dict[str, list[dict]], exact: dict[str, list]) -> dict:
    """transformers fp32: greedy tokens for the exactness check, and teacher-forced scores of
    every side's benchmarked tokens (argmax / top-5 agreement), each on its reference
    checkpoint (:func:`side_checkpoints`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    n = args.check_requests
    by_reference: dict[str, list[str]] = {}
    for side in runs:
        by_reference.setdefault(args.side_checkpoints.get(side, (None, args.checkpoint))[1], []).append(side)
    report, ref = {}, None
    for reference, sides in by_reference.items():
        model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None
        if reference == args.checkpoint:
            with torch.no_grad():
                ids = torch.tensor(prompts[:n])
                ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.check_tokens,
                                     do_sample=False, pad_token_id=0)[:, ids.shape[1]:].tolist()  # fmt: skip
        for side in sides:
            report[side] = _agreement(args, model, prompts, runs[side])
            if side in exact:
                same = sum(a == b for a, b in zip(exact[side], ref))
                report[side]["fp32_exact"] = f"{same}/{len(ref)}"
        del model
    return report


def _agreement(args, model, prompts: list[list[int]], side_runs: list[dict]) -> dict:
    import torch

    first, top5, total, stable = 0, 0, 0, True
    for batch in map(str, args.batches):
        seqs = side_runs[0][batch]["tokens"]
        stable &= all(r[batch]["tokens"] == seqs for r in side_runs)
        for prompt, generated in zip(prompts, seqs):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1 : -1]
            chosen = torch.tensor(generated)
            first += int((logits.argmax(-1) == chosen).sum())
            top5 += int((logits.topk(5, dim=-1).indices == chosen[:, None]).any(-1).sum())
            total += len(generated)
    return {"argmax_pct": 100 * first / total, "top5_pct": 100 * top5 / total, "same_tokens_every_run": stable}


def environment(args) -> dict:
    import torch
    import transformers

    from vllm_laguna.cpu_kind import detect

    try:
        from importlib.metadata import version

        vllm_version = version("vllm-cpu")
    except Exception:
        vllm_version = "?"
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu, "cpu_kind": detect().name, "cores": os.cpu_count(), "threads": args.threads,
        "vllm": vllm_version, "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(),
        "vllm engine": "in-process" if args.in_process_engine else "engine-core + worker processes (default)",
    }  # fmt: skip


def print_table(args, medians: dict, report: dict, env: dict, weights: dict[str, dict | None]) -> None:
    print(f"\n{args.model} ({args.checkpoint}), bf16, {args.input_len} prompt + {args.output_len} output tokens, "
          f"median of {args.runs} interleaved runs")  # fmt: skip
    print("env: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    print("| side | batch | decode tok/s | TTFT ms | end-to-end out tok/s | peak RSS GiB | weights MB | "
          "weight MB read / decode step | plugin decode x | plugin e2e x |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch in map(str, args.batches):
        base = medians["plugin"].get(batch)
        for side, per_batch in medians.items():
            m = per_batch.get(batch)
            if not m:
                continue
            ratio_dec = base["decode_tok_s"] / m["decode_tok_s"] if side != "plugin" else 1.0
            ratio_e2e = base["e2e_tok_s"] / m["e2e_tok_s"] if side != "plugin" else 1.0
            w = weights.get(side)
            total = f"{sum(w[g] for g in ('experts', 'embedding', 'other')) / 1e6:.1f}" if w else "n/a"
            read = f"{step_bytes(w, int(batch)) / 1e6:.1f}" if w else "n/a"
            print(f"| {side} | {batch} | {m['decode_tok_s']:.1f} | {m['ttft_ms']:.0f} | {m['e2e_tok_s']:.1f} | "
                  f"{m['peak_rss_gib']:.2f} | {total} | {read} | {ratio_dec:.2f} | {ratio_e2e:.2f} |")  # fmt: skip
    print("\ntoken checks (bf16 tokens scored by transformers fp32, first "
          f"{args.check_requests} requests of every batch):")  # fmt: skip
    for side, r in report.items():
        print(f"  {side}: argmax {r['argmax_pct']:.1f}%, top-5 {r['top5_pct']:.1f}%, "
              f"same tokens every run: {r['same_tokens_every_run']}"
              + (f", fp32 greedy == transformers: {r['fp32_exact']}" if "fp32_exact" in r else ""))  # fmt: skip


def verdict(report: dict) -> list[str]:
    problems = []
    plugin = report["plugin"]
    if plugin.get("fp32_exact") and plugin["fp32_exact"].split("/")[0] != plugin["fp32_exact"].split("/")[1]:
        problems.append(f"plugin fp32 tokens differ from transformers ({plugin['fp32_exact']})")
    floor = report["transformers"]["top5_pct"] - 5 if "transformers" in report else 90.0
    for side, checks in report.items():
        if side.startswith("plugin") and checks["top5_pct"] < floor:
            problems.append(f"{side} bf16 tokens in the reference top-5 {checks['top5_pct']:.1f}% < {floor:.1f}%")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", choices=sorted(SIDES_BY_MODEL))
    parser.add_argument("--model-dir", help="checkpoint to use (default: build the model's benchmark preset)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/vllm-laguna-bench"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="interleaved rounds (A B A B ...)")
    parser.add_argument(
        "--sides",
        nargs="+",
        choices=sorted({side for sides in SIDES_BY_MODEL.values() for side in sides}),
        help="default: plugin and the model's comparison side; the plugin is always run, every ratio is its own",
    )
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM eager mode (default: vLLM's compiled mode)")
    parser.add_argument(
        "--in-process-engine",
        action="store_true",
        help="run vLLM's engine in the caller's process (VLLM_ENABLE_V1_MULTIPROCESSING=0) instead of its default "
        "engine-core and worker processes, which busy-poll each other and take CPU from the compute threads",
    )
    parser.add_argument("--vllm-args", default="{}", help="extra LLM(...) keyword arguments as JSON")
    parser.add_argument("--check-requests", type=int, default=4)
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument(
        "--quant", nargs="+", default=[], choices=("int8", "int4", "int8+linears", "int4+linears"),
        help="laguna: add a plugin side per scheme on the checkpoint's routed experts (+linears: and every other "
        "linear but the router, LM head and, for int4, the per-head gate) quantized",
    )  # fmt: skip
    parser.add_argument("--group-size", type=int, default=128, help="--quant int4's group size")
    parser.add_argument("--llama-cpp", help="directory holding llama-batched-bench (adds llama.cpp sides)")
    parser.add_argument("--llama-cpp-args", default="", help="extra llama-batched-bench arguments, e.g. '-nr'")
    parser.add_argument(
        "--gguf", nargs="+", default=[], help="the checkpoint converted by llama.cpp (convert_hf_to_gguf.py, "
        "llama-quantize): one llama.cpp side per file"
    )  # fmt: skip
    parser.add_argument("--json", help="write all runs, medians and checks here")
    # worker-only options
    parser.add_argument("--worker", choices=("vllm", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", default="bfloat16", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    parser.add_argument("--prompts", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.model = args.model_dir
        worker_main(args)
        return 0
    if args.llama_cpp and not args.gguf:
        parser.error("--llama-cpp needs --gguf")
    if args.quant and args.model != "laguna":
        parser.error("--quant: laguna only")

    args.checkpoint = build_checkpoint(args)
    args.side_checkpoints = side_checkpoints(args)
    sides = list(dict.fromkeys(["plugin", *(f"plugin-{q}" for q in args.quant), *(args.sides or SIDES_BY_MODEL[args.model])]))
    work = Path(args.cache_dir) / "runs"
    work.mkdir(parents=True, exist_ok=True)
    prompts = make_prompts(args.checkpoint, max(args.batches), args.input_len)
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    runs: dict[str, list[dict]] = {side: [] for side in sides}
    failed: dict[str, str] = {}  # comparison sides that could not run the checkpoint, and why
    llama_runs: dict[str, list[dict]] = {llama_cpp_side(gguf): [] for gguf in args.gguf} if args.llama_cpp else {}
    for round_ in range(args.runs):
        for side in [side for side in sides if side not in failed]:
            print(f"run {round_ + 1}/{args.runs}: {side}", flush=True)
            try:
                runs[side].append(spawn(args, side, "bfloat16", prompts_file, work / f"{side}-{round_}.json"))
            except SideFailed as err:
                if side == "plugin":
                    raise
                # e.g. vLLM in-tree on a config form it cannot read: report the plugin's figures
                # and the reason instead of losing the whole run
                failed[side] = str(err)
                del runs[side]
                print(f"dropped: {err}", flush=True)
        for gguf in args.gguf if args.llama_cpp else []:
            print(f"run {round_ + 1}/{args.runs}: {llama_cpp_side(gguf)}", flush=True)
            llama_runs[llama_cpp_side(gguf)].append(run_llama_cpp(args, gguf))
    exact = {}
    for side in runs:
        if side in VLLM_SIDES:
            print(f"fp32 check: {side}", flush=True)
            exact[side] = spawn(args, side, "float32", prompts_file, work / f"{side}-fp32.json")["check_tokens"]
    report = reference_check(args, prompts, runs, exact)

    all_runs = dict(runs) | llama_runs
    medians = {
        side: {
            batch: {k: statistics.median(r[batch][k] for r in side_runs) for k in ("decode_tok_s", "ttft_ms", "e2e_tok_s", "peak_rss_gib")}
            for batch in map(str, args.batches)
            if all(batch in r for r in side_runs)
        }
        for side, side_runs in all_runs.items()
    }  # fmt: skip
    env = environment(args)
    weights = {side: safetensors_weight_bytes(args.side_checkpoints[side][0]) for side in runs if side.startswith("plugin")}
    weights |= {llama_cpp_side(gguf): gguf_weight_bytes(gguf) for gguf in args.gguf if args.llama_cpp}
    print_table(args, medians, report, env, weights)
    for side, reason in failed.items():
        print(f"NOT RUN: {reason}")
    problems = verdict(report)
    for problem in problems:
        print(f"WRONG: {problem}")
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "runs": all_runs, "medians": medians, "checks": report,
                                               "failed": failed, "weights": weights}, indent=1))  # fmt: skip
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
