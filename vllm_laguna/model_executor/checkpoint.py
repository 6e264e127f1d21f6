"""Checkpoint completeness, reported in the checkpoint's own tensor names.

vLLM's loader reports a missing tensor by the *model's* parameter name, and only when a
whole parameter was never touched: a stacked ``qkv_proj`` missing its ``v_proj`` shard, or
an MoE layer missing one expert, passes silently. ``AutoWeightsLoader`` also drops any
unexpected ``*.bias`` without a word. :class:`CheckpointAudit` watches the stream of
``(name, tensor)`` pairs on its way to the loader and fails with the checkpoint names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch


class CheckpointError(ValueError):
    """A checkpoint lacks a tensor the config implies, or holds one it does not."""


def _satisfies(seen: str, required: str) -> bool:
    """``seen`` provides ``required``: same name, or a quantized variant of a ``.weight``
    (compressed-tensors stores ``weight_packed``/``weight_scale`` beside or instead of it,
    AWQ and GPTQ ``qweight``)."""
    if seen == required:
        return True
    stem, _, leaf = required.rpartition(".")
    return leaf == "weight" and (seen.startswith(f"{stem}.weight") or seen == f"{stem}.qweight")


class CheckpointAudit:
    """Records what a checkpoint provided and compares it with a :class:`Spec`."""

    @dataclass
    class Spec:
        #: groups of alternative names; each group needs one member present
        groups: list[tuple[str, ...]] = field(default_factory=list)
        #: (prefix, num_experts) of MoE layers: per-expert or fused tensors
        experts: list[tuple[str, int]] = field(default_factory=list)

        def require(self, *names: str) -> None:
            self.groups.extend((n,) for n in names)

        def require_one_of(self, *names: str) -> None:
            self.groups.append(tuple(names))

        def require_experts(self, prefix: str, num_experts: int) -> None:
            self.experts.append((prefix, num_experts))

    def __init__(self, spec: Spec):
        self.spec = spec
        self.seen: list[str] = []
        self._known_biases = {n for g in spec.groups for n in g if n.endswith(".bias")}

    def watch(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            if name.endswith(".bias") and "experts." not in name and name not in self._known_biases:
                raise CheckpointError(
                    f"unexpected tensor {name!r} in the checkpoint: the config declares no bias "
                    "there (check attention_bias)"
                )
            self.seen.append(name)
            yield name, tensor

    def missing(self) -> list[str]:
        seen = set(self.seen)
        by_stem: dict[str, list[str]] = {}
        for name in seen:
            by_stem.setdefault(name.rsplit(".", 1)[0], []).append(name)

        def present(required: str) -> bool:
            stem = required.rsplit(".", 1)[0]
            return any(_satisfies(s, required) for s in by_stem.get(stem, ()))

        missing = [g[0] if len(g) == 1 else " or ".join(g) for g in self.spec.groups if not any(map(present, g))]
        for prefix, num_experts in self.spec.experts:
            if f"{prefix}.gate_up_proj" in seen or f"{prefix}.down_proj" in seen:
                missing += [n for n in (f"{prefix}.gate_up_proj", f"{prefix}.down_proj") if n not in seen]
                continue
            for e in range(num_experts):
                for proj in ("gate_proj", "up_proj", "down_proj"):
                    name = f"{prefix}.{e}.{proj}.weight"
                    if not present(name):
                        missing.append(name)
        return missing

    def raise_if_incomplete(self) -> None:
        missing = self.missing()
        if missing:
            shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
            raise CheckpointError(f"checkpoint is missing tensors: {shown}")
