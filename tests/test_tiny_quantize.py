"""The quantized tiny checkpoints (``vllm_laguna.tiny.quantize``) hold what the formats define,
their twins are the exact dequantization, and vLLM reads their quantization config as the
scheme intended. No engine runs here: ``test_laguna_quantized_experts.py`` runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vllm_laguna.model_executor.cpu_support import INT4_EXPERTS, INT8_EXPERTS, expert_scheme
from vllm_laguna.tiny.__main__ import main
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.quantize import quantize_checkpoint

EXPERT = "model.layers.1.mlp.experts.5.down_proj."
WIDE = {"hidden_size": 256, "moe_intermediate_size": 256}


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _unpack_int4(packed: torch.Tensor, columns: int) -> torch.Tensor:
    """compressed-tensors' pack-quantized layout, read independently of its code: eight
    signed 4-bit values per int32, lowest nibble first, stored offset by 8."""
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(packed.shape[0], -1)
    return nibbles[:, :columns] - 8


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    base = build_laguna(root / "base", **WIDE)
    made = {s: quantize_checkpoint(base, root / s, root / f"{s}-twin", scheme=s) for s in ("int8", "int4")}
    return base, made


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_twin_is_the_exact_dequantization(checkpoints, scheme):
    base, made = checkpoints
    quantized, twin = made[scheme]
    stored, exact, source = _tensors(quantized), _tensors(twin), _tensors(base)
    scale = stored[EXPERT + "weight_scale"]
    assert scale.dtype == torch.bfloat16
    if scheme == "int8":
        values = stored[EXPERT + "weight"]
        assert values.dtype == torch.int8 and scale.shape == (256, 1)
    else:
        assert stored[EXPERT + "weight_shape"].tolist() == [256, 256]
        assert stored[EXPERT + "weight_packed"].dtype == torch.int32 and scale.shape == (256, 2)
        values = _unpack_int4(stored[EXPERT + "weight_packed"], 256)
        assert values.min() >= -8 and values.max() <= 7
    dequantized = values.float() * scale.float().repeat_interleave(256 // scale.shape[1], dim=1)
    assert exact[EXPERT + "weight"].dtype == torch.float32
    assert torch.equal(exact[EXPERT + "weight"], dequantized)
    # rounded to a nearby level: within a step of the source weight (half a step but at the
    # clamped ends: compressed-tensors' symmetric scale is max|w| / 7.5 for int4, whose top
    # level is 7, and the scales are rounded to bf16)
    step = scale.float().repeat_interleave(256 // scale.shape[1], dim=1)
    assert ((dequantized - source[EXPERT + "weight"]).abs() <= step).all()
    # everything else unchanged, and only the quantized checkpoint says it is quantized
    attention = "model.layers.1.self_attn.o_proj.weight"
    assert torch.equal(stored[attention], source[attention]) and torch.equal(exact[attention], source[attention])
    assert "quantization_config" not in json.loads((twin / "config.json").read_text())


@pytest.mark.parametrize("scheme, expected", [("int8", INT8_EXPERTS), ("int4", INT4_EXPERTS)])
def test_vllm_reads_the_scheme_on_the_experts_only(checkpoints, scheme, expected):
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    config = json.loads((checkpoints[1][scheme][0] / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    parsed = CompressedTensorsConfig.from_config(config)
    assert expert_scheme(parsed, "model.layers.1.mlp.experts") == expected


def test_the_cli_writes_the_checkpoint_and_its_twin(tmp_path, capsys):
    out = tmp_path / "int4"
    main(["laguna", str(out), "--quantize", "int4", "--group-size", "64", *(f"--set={k}={v}" for k, v in WIDE.items())])
    assert capsys.readouterr().out.split() == [str(out), str(tmp_path / "int4-dequantized")]
    assert _tensors(out)[EXPERT + "weight_scale"].shape == (256, 4)
    assert (tmp_path / "int4-dequantized" / "tokenizer.json").exists()


def test_a_group_size_that_does_not_divide_the_width_is_refused(tmp_path):
    base = build_laguna(tmp_path / "base")  # 32-wide experts
    with pytest.raises(ValueError, match="group size 128 does not divide (32|64) input columns"):
        quantize_checkpoint(base, tmp_path / "q", tmp_path / "t", scheme="int4")


def test_llama4_twin_fuses_the_dequantized_experts(tmp_path, capsys):
    """Llama 4 through the CLI: per-expert int8 experts in the quantized checkpoint; in the twin
    the dequantized experts fused as transformers reads them (``x @ gate_up`` gives gate then
    up), equal to the compressor's own decompression of the stored values."""
    out = tmp_path / "int8"
    main(["llama4", str(out), "--quantize", "int8"])
    stored, twin = _tensors(out), _tensors(tmp_path / "int8-dequantized")
    prefix = "model.layers.1.feed_forward.experts"
    assert f"{prefix}.3.gate_proj.weight" in stored and f"{prefix}.gate_up_proj" not in stored
    assert not any(".experts.3." in name for name in twin)

    def dequantized(proj: str) -> torch.Tensor:
        return stored[f"{prefix}.3.{proj}.weight"].float() * stored[f"{prefix}.3.{proj}.weight_scale"].float()

    inner = dequantized("gate_proj").shape[0]
    assert torch.equal(twin[f"{prefix}.gate_up_proj"][3, :, :inner], dequantized("gate_proj").T)
    assert torch.equal(twin[f"{prefix}.gate_up_proj"][3, :, inner:], dequantized("up_proj").T)
    assert torch.equal(twin[f"{prefix}.down_proj"][3], dequantized("down_proj").T)
    assert torch.equal(twin["model.layers.1.feed_forward.router.weight"], stored["model.layers.1.feed_forward.router.weight"].float())


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """The eight 4-bit values of each int32 word, lowest first: ``[..., n] -> [..., n, 8]``."""
    words = words.view(torch.uint32).to(torch.int64)
    return torch.stack([(words >> (4 * i)) & 0xF for i in range(8)], dim=-1)


@pytest.mark.parametrize("scheme", ["int4-awq", "int4-gptq"])
def test_awq_and_gptq_hold_what_the_formats_define(tmp_path, scheme):
    """Read back independently of the writer: AWQ (AutoAWQ GEMM) ``qweight`` ``[in, out / 8]``
    with word ``j``'s nibble ``k`` holding output ``8 j + (0, 2, 4, 6, 1, 3, 5, 7)[k]``, zero
    points packed the same way, ``w = (q - zero) * scale``; GPTQ ``qweight`` ``[in / 8, out]``
    with nibble ``k`` holding input ``8 i + k``, ``qzeros`` storing ``zero - 1`` (v1), symmetric
    (zero 8), ``g_idx = input // group``. The twin holds exactly that dequantization, every
    linear but the router and ``g_proj`` is quantized, and vLLM reads the config as the int4
    scheme its CPU MoE kernel takes."""
    from vllm.model_executor.layers.quantization import get_quantization_config

    base = build_laguna(tmp_path / "base", **WIDE)
    quantized, twin = quantize_checkpoint(base, tmp_path / "q", tmp_path / "t", scheme=scheme, group_size=32)
    stored, exact = _tensors(quantized), _tensors(twin)
    stem = EXPERT.removesuffix(".")
    out_features, in_features = exact[EXPERT + "weight"].shape
    scales = stored[f"{stem}.scales"].float()  # [in / 32, out]
    assert stored[f"{stem}.scales"].dtype == torch.float16 and scales.shape == (in_features // 32, out_features)
    if scheme == "int4-awq":
        order = torch.tensor([0, 2, 4, 6, 1, 3, 5, 7])

        def columns(words):  # [rows, out / 8] -> [rows, out]
            values = torch.empty(*words.shape[:-1], words.shape[-1] * 8, dtype=torch.int64)
            values.view(*words.shape, 8)[..., order] = _nibbles(words)
            return values

        q, zero = columns(stored[f"{stem}.qweight"]), columns(stored[f"{stem}.qzeros"])
    else:
        q = _nibbles(stored[f"{stem}.qweight"].T).reshape(out_features, in_features).T  # [in, out]
        zero = _nibbles(stored[f"{stem}.qzeros"]).reshape(in_features // 32, out_features) + 1
        assert (zero == 8).all()
        assert torch.equal(stored[f"{stem}.g_idx"], torch.arange(in_features, dtype=torch.int32) // 32)
    group = torch.arange(in_features) // 32
    dequantized = ((q - zero[group]) * scales[group]).T
    assert torch.equal(exact[EXPERT + "weight"], dequantized.float())
    assert f"model.layers.1.self_attn.o_proj.qweight" in stored and "model.layers.1.self_attn.g_proj.weight" in stored
    assert "model.layers.1.mlp.gate.weight" in stored and "lm_head.weight" in stored
    config = json.loads((quantized / "config.json").read_text())["quantization_config"]
    parsed = get_quantization_config(config["quant_method"]).from_config(config)
    assert expert_scheme(parsed, "model.layers.1.mlp.experts") == INT4_EXPERTS
