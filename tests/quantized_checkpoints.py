"""Quantized variants of the tiny checkpoints, in compressed-tensors' on-disk format.

Each writer quantizes a selection of linear weights, writes the checkpoint with its
``quantization_config``, and writes the exact dequantized twin (same weights, as fp32, no
quantization config) that transformers runs as the reference, so a comparison measures the
kernels and not the rounding of the weights.

* :func:`int8_w8a8`: linear weights per output channel to int8 (dynamic per-token int8
  activations at run time); routed experts and router stay full precision.
* :func:`fp8_block_experts`: the routed experts' weights to FP8 (e4m3) with one scale per
  128x128 block (llm-compressor's ``FP8_BLOCK``), everything else full precision.
* int8 W8A8 and int4 W4A16 routed experts are written by compressed-tensors' own compressors,
  AWQ and GPTQ checkpoints in those formats (:func:`vllm_laguna.tiny.quantize.quantize_checkpoint`);
  :func:`roll_expert_scales` and :func:`reverse_scale_groups` plant scale bugs in such a
  checkpoint, :func:`awq_pack_in_sequence` a packing bug.
* :func:`nvfp4_tensor_names` lists the tensors an NVFP4 checkpoint of the same model holds
  (Laguna-M.1-NVFP4's layout: MLPs and experts NVFP4, attention and router bf16).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoint_edits import rewrite_tensors

#: modules left in full precision, as compressed-tensors' `ignore` list writes them
INT8_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*mlp\\.experts\\..*"]
#: the routed experts' per-expert weights, as compressed-tensors targets them
EXPERTS_TARGET = "re:.*mlp\\.experts\\..*"
FP8_BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max

Quantizer = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def _int8_args(dynamic: bool, strategy: str) -> dict:
    return {"num_bits": 8, "type": "int", "strategy": strategy, "symmetric": True, "dynamic": dynamic}


def int8_quant_config(targets: list[str], ignore: list[str]) -> dict:
    """int8 W8A8: per-channel weights, dynamic per-token activations."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": targets,
                "weights": _int8_args(False, "channel"),
                "input_activations": _int8_args(True, "token"),
            }
        },
        "ignore": ignore,
    }


def fp8_block_quant_config() -> dict:
    """FP8 e4m3 weights with 128x128 block scales, dynamic per-128-group activations, on the
    routed experts only."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": [EXPERTS_TARGET],
                "weights": {
                    "num_bits": 8, "type": "float", "strategy": "block", "block_structure": [FP8_BLOCK, FP8_BLOCK],
                    "symmetric": True, "dynamic": False,
                },
                "input_activations": {
                    "num_bits": 8, "type": "float", "strategy": "group", "group_size": FP8_BLOCK,
                    "symmetric": True, "dynamic": True,
                },
            }
        },
        "ignore": ["lm_head"],
    }


def _int8_per_channel(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    scale = weight.float().abs().amax(dim=1, keepdim=True) / 127
    return {"weight": torch.round(weight.float() / scale).clamp(-128, 127).to(torch.int8), "weight_scale": scale}


def _fp8_per_block(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    rows, cols = weight.shape
    if rows % FP8_BLOCK or cols % FP8_BLOCK:
        raise ValueError(f"FP8 block quantization needs multiples of {FP8_BLOCK}, got {tuple(weight.shape)}")
    blocks = weight.float().reshape(rows // FP8_BLOCK, FP8_BLOCK, cols // FP8_BLOCK, FP8_BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)) / FP8_MAX
    quantized = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(rows, cols)
    return {"weight": quantized, "weight_scale": scale}


def _dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = weight.shape
    block_rows, block_cols = rows // scale.shape[0], cols // scale.shape[1]
    return weight.float() * scale.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)


def _write(src: Path, quantized: Path, dequantized: Path, config: dict, selected, quantize: Quantizer) -> None:
    def quantize_all(tensors):
        out = {}
        for name, t in tensors.items():
            if not selected(name, t):
                out[name] = t
                continue
            stem = name.removesuffix("weight")
            out.update({stem + leaf: v for leaf, v in quantize(t).items()})
        return out

    def dequantize_all(tensors):
        out = {}
        for name, t in tensors.items():
            if name.endswith("weight_scale"):
                continue
            scale = tensors.get(name.removesuffix("weight") + "weight_scale")
            out[name] = _dequantize(t, scale) if scale is not None else t
        return out

    for dst, convert in ((quantized, quantize_all), (dequantized, dequantize_all)):
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src if dst == quantized else quantized, dst)
        rewrite_tensors(dst, convert)
    meta = json.loads((quantized / "config.json").read_text())
    meta["quantization_config"] = config
    (quantized / "config.json").write_text(json.dumps(meta, indent=2))


def _is_expert_weight(name: str, tensor: torch.Tensor) -> bool:
    return re.search(r"\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$", name) is not None


def _is_dense_linear(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() == 2 and name.endswith("_proj.weight") and ".mlp.experts." not in name


def int8_w8a8(src: Path, quantized: Path, dequantized: Path) -> None:
    """int8 W8A8 linears (attention, dense and shared-expert MLPs); experts and router full precision."""
    _write(src, quantized, dequantized, int8_quant_config(["Linear"], INT8_IGNORE), _is_dense_linear, _int8_per_channel)


def fp8_block_experts(src: Path, quantized: Path, dequantized: Path) -> None:
    """Routed experts as FP8 with 128x128 blocks (Hub layout: per-expert tensors)."""
    _write(src, quantized, dequantized, fp8_block_quant_config(), _is_expert_weight, _fp8_per_block)


def vary_expert_blocks(ckpt: Path) -> None:
    """Scale each 128x128 block of every expert weight by 1/2, 1 or 2 (varying with the block
    and the expert), so that the FP8 block scales differ and one applied to the wrong block or
    expert changes the output instead of hiding."""

    def vary(tensors):
        out = {}
        for name, t in tensors.items():
            if not _is_expert_weight(name, t):
                out[name] = t
                continue
            expert = int(re.search(r"experts\.(\d+)\.", name).group(1))
            rows, cols = t.shape[0] // FP8_BLOCK, t.shape[1] // FP8_BLOCK
            exponent = (torch.arange(rows)[:, None] + 2 * torch.arange(cols)[None, :] + expert) % 3 - 1
            factor = (2.0 ** exponent).repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
            out[name] = (t.float() * factor).to(t.dtype)
        return out

    rewrite_tensors(ckpt, vary)


def roll_expert_scales(ckpt: Path) -> None:
    """Planted bug: every routed expert ``e`` gets the weight scales (compressed-tensors'
    ``weight_scale``, AWQ/GPTQ's ``scales``) of expert ``e + 1`` (mod the expert count), as a
    loader mapping scales to the wrong expert would."""

    pattern = re.compile(r"\.experts\.(\d+)\.\w+_proj\.(weight_scale|scales)$")
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    scales = {}  # every shard's, as an expert's neighbour may sit in another shard
    for shard in set(index["weight_map"].values()):
        scales.update({n: t for n, t in load_file(ckpt / shard).items() if pattern.search(n)})
    experts = 1 + max(int(pattern.search(name).group(1)) for name in scales)

    def neighbour(name: str) -> str:
        expert = int(pattern.search(name).group(1))
        return name.replace(f".experts.{expert}.", f".experts.{(expert + 1) % experts}.")

    def roll(tensors):
        return {name: scales[neighbour(name)] if name in scales else t for name, t in tensors.items()}

    rewrite_tensors(ckpt, roll)


def reverse_scale_groups(ckpt: Path) -> None:
    """Planted bug: the group scales of every routed expert weight (``weight_scale``
    ``[out, in / group]``) in reverse group order, as a loader mixing up groups would."""

    def reverse(tensors):
        return {
            name: t.flip(-1) if ".experts." in name and name.endswith("weight_scale") else t
            for name, t in tensors.items()
        }

    rewrite_tensors(ckpt, reverse)


NVFP4_QUANT_CONFIG = {
    "quant_method": "compressed-tensors",
    "format": "nvfp4-pack-quantized",
    "quantization_status": "compressed",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "format": "nvfp4-pack-quantized",
            "weights": {
                "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                "symmetric": True, "dynamic": False,
            },
            "input_activations": {
                "num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                "symmetric": True, "dynamic": "local",
            },
        }
    },
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*mlp\\.gate$"],
    "kv_cache_scheme": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True},
}

NVFP4_SUFFIXES = ("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")


def nvfp4_tensor_names(hub_names: list[str]) -> list[str]:
    """The tensor names of an NVFP4 (M.1-style) checkpoint with these full-precision names."""
    names = []
    for name in hub_names:
        quantized = name.endswith("_proj.weight") and ".self_attn." not in name
        if quantized:
            stem = name.removesuffix("weight")
            names += [stem + s for s in NVFP4_SUFFIXES]
        else:
            names.append(name)
        if name.endswith("self_attn.k_proj.weight"):
            prefix = name.removesuffix("k_proj.weight")
            names += [prefix + "k_scale", prefix + "v_scale"]
    return names


def awq_pack_in_sequence(ckpt: Path) -> None:
    """Planted bug: every routed expert's AWQ ``qweight`` with each word's eight 4-bit values in
    plain order (column ``8 j + k`` in bits ``4 k``) instead of AutoAWQ's ``0 2 4 6 1 3 5 7``,
    as a packer that ignores AWQ's order would write it."""
    from vllm_laguna.tiny.quantize import AWQ_ORDER

    def repack(tensors):
        out = {}
        for name, t in tensors.items():
            if ".experts." in name and name.endswith(".qweight"):
                words = t.view(torch.uint32).to(torch.int64)
                t = sum(((words >> (4 * k)) & 15) << (4 * column) for k, column in enumerate(AWQ_ORDER))
                t = t.to(torch.uint32).view(torch.int32)
            out[name] = t
        return out

    rewrite_tensors(ckpt, repack)
