"""Quantized variants of the tiny checkpoints, in compressed-tensors' on-disk format.

* :func:`int8_w8a8` quantizes linear weights per output channel to int8 (dynamic per-token
  int8 activations at run time) and writes the dequantized twin that transformers runs as
  the reference. vLLM's CPU backend runs int8 linears; its quantized fused-MoE kernels all
  need AMX, so the routed experts stay unquantized (listed in ``ignore``).
* :func:`nvfp4_tensor_names` lists the tensors an NVFP4 checkpoint of the same model holds
  (Laguna-M.1-NVFP4's layout: MLPs and experts NVFP4, attention and router bf16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from checkpoint_edits import rewrite_tensors

#: modules left in full precision, as compressed-tensors' `ignore` list writes them
INT8_IGNORE = ["lm_head", "re:.*mlp\\.gate$", "re:.*mlp\\.experts\\..*"]


def _quantizable(name: str, tensor: torch.Tensor) -> bool:
    if tensor.dim() != 2 or not name.endswith("_proj.weight"):
        return False
    return ".mlp.experts." not in name


def _rewrite(src: Path, dst: Path, convert) -> None:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    rewrite_tensors(dst, convert)


def int8_w8a8(src: Path, quantized: Path, dequantized: Path) -> None:
    """Write the int8 checkpoint to ``quantized`` and its exact dequantized twin to ``dequantized``."""

    def quantize(tensors):
        out = {}
        for name, t in tensors.items():
            if not _quantizable(name, t):
                out[name] = t
                continue
            scale = t.float().abs().amax(dim=1, keepdim=True) / 127
            out[name] = torch.round(t.float() / scale).clamp(-128, 127).to(torch.int8)
            out[name.removesuffix("weight") + "weight_scale"] = scale
        return out

    def dequantize(tensors):
        out = {}
        for name, t in tensors.items():
            if name.endswith("weight_scale"):
                continue
            scale = tensors.get(name.removesuffix("weight") + "weight_scale")
            out[name] = t.float() * scale if scale is not None else t
        return out

    _rewrite(src, quantized, quantize)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
                "input_activations": {
                    "num_bits": 8, "type": "int", "strategy": "token", "symmetric": True, "dynamic": True
                },
            }
        },
        "ignore": INT8_IGNORE,
    }
    (quantized / "config.json").write_text(json.dumps(config, indent=2))

    _rewrite(quantized, dequantized, dequantize)
    config.pop("quantization_config")
    (dequantized / "config.json").write_text(json.dumps(config, indent=2))


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
