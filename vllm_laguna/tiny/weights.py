"""Random weights and the on-disk checkpoint format shared by the tiny builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


class RandomWeights:
    """Seeded generator of linear weights (normal, ``std``) and norm weights (around 1)."""

    def __init__(self, seed: int, std: float):
        self.gen = torch.Generator().manual_seed(seed)
        self.std = std

    def normal(self, *shape: int, std: float | None = None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * (self.std if std is None else std)

    def norm(self, n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=self.gen)


def save_checkpoint(
    out: Path,
    config: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    generation: dict[str, Any] | None = None,
    num_shards: int = 2,
) -> None:
    """Write ``config.json`` and the weights as sharded safetensors with an index, as the
    Hub does (``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if generation is not None:
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    names = list(state_dict)
    num_shards = max(1, min(num_shards, len(names)))
    per_shard = -(-len(names) // num_shards)
    weight_map = {}
    for s in range(num_shards):
        file = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: state_dict[n].contiguous() for n in names[s * per_shard : (s + 1) * per_shard]}
        save_file(chunk, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    total = sum(t.numel() * t.element_size() for t in state_dict.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
