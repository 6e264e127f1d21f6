"""The CPU bf16 linears over fp32 GEMMs (model_executor/layers/cpu_gemm.py): for wide outputs
FBGEMM's over an fp16 copy at decode batches and vLLM's oneDNN for prompts, torch's fp32 GEMM
for narrow ones (gates, routers).

Both run on every x86 CPU (fp32 GEMMs exist everywhere); the models switch to them only
where oneDNN has no bf16 matmul, which test_laguna_modes' bf16 run covers end to end.
"""

from __future__ import annotations

import gc
from types import SimpleNamespace

import pytest
import torch

from vllm import _custom_ops as ops

from loaded_models import load_model, process_group  # noqa: F401 (fixture)
from vllm_laguna.model_executor.layers import cpu_gemm  # registers the op
from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna

OUT, IN = 160, 96


def _fp32_product(x, w, b):
    """What the op promises: the bf16 values multiplied in fp32, rounded to bf16 once."""
    y = x.float() @ w.float().T
    return (y if b is None else y + b.float()).to(torch.bfloat16)


@pytest.mark.parametrize("rows", [1, 3, 32])
@pytest.mark.parametrize("with_bias", [False, True])
def test_equals_the_fp32_product_of_the_bf16_values(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=gen).to(torch.bfloat16)
    w = (torch.randn(OUT, IN, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(OUT, generator=gen).to(torch.bfloat16) if with_bias else None
    dnnl = ops.create_onednn_mm(w.float().t(), 8)
    out = torch.ops.vllm_laguna.wide_bf16_linear(x, w, b, dnnl.handler_tensor, OUT)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, OUT)
    # same math, another summation order: at most one bf16 rounding step apart
    torch.testing.assert_close(out.float(), _fp32_product(x, w, b).float(), rtol=2**-7, atol=1e-5)


needs_fbgemm = pytest.mark.skipif(
    not cpu_gemm.fbgemm_available(), reason="this torch build has no FBGEMM (not x86): no fp16 copies are made"
)


@needs_fbgemm
@pytest.mark.parametrize("shape", [(OUT, IN), (IN, OUT)], ids=["wider-out", "wider-in"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_wide_linear_equals_the_fp32_product_at_every_row_count(shape, with_bias):
    """One layer, every branch: the fp16 copy up to MAX_FP16_ROWS rows (at one row only when
    wider out than in, else torch's bf16 GEMV), oneDNN's fp32 beyond."""
    gen = torch.Generator().manual_seed(shape[0])
    w = (torch.randn(*shape, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(shape[0], generator=gen).to(torch.bfloat16) if with_bias else None
    linear = cpu_gemm._wide_linear(w)
    assert linear.fp16.at_one_row == (shape[0] > shape[1]) and linear.fp16.max_rows == cpu_gemm.MAX_FP16_ROWS
    for rows in (1, 2, cpu_gemm.MAX_FP16_ROWS, cpu_gemm.MAX_FP16_ROWS + 1, 300):
        x = torch.randn(rows, shape[1], generator=gen).to(torch.bfloat16)
        out = linear(x, w, b)
        assert out.dtype == torch.bfloat16 and out.shape == (rows, shape[0])
        torch.testing.assert_close(out.float(), _fp32_product(x, w, b).float(), rtol=2**-7, atol=1e-5)


@needs_fbgemm
@pytest.mark.parametrize("at_one_row", [True, False])
@pytest.mark.parametrize("max_rows", [cpu_gemm.MAX_FP16_ROWS, cpu_gemm.MAX_FP16_ROWS_VOCAB])
def test_row_count_picks_the_fp16_copy_up_to_its_max_rows(at_one_row, max_rows):
    """The fp16 copy swapped for one of 2 * w shows which rows read it."""
    w = (torch.randn(OUT, IN) * 0.1).to(torch.bfloat16)
    linear = cpu_gemm._wide_linear(w)
    doubled = torch.ops.quantized.linear_prepack_fp16(2 * w.float(), None)
    cpu_gemm._FP16_COPIES[w.data_ptr()] = cpu_gemm._Fp16Copy(doubled, at_one_row, max_rows)
    try:
        for rows, factor in [(1, 2 if at_one_row else 1), (2, 2), (max_rows, 2), (max_rows + 1, 1)]:
            x = torch.randn(rows, IN).to(torch.bfloat16)
            expected = _fp32_product(x, factor * w.float(), None)
            torch.testing.assert_close(linear(x, w, None).float(), expected.float(), rtol=2**-7, atol=1e-5)
    finally:  # while the layer lives, so that its end removes the entry
        cpu_gemm._FP16_COPIES[w.data_ptr()] = linear.fp16


@needs_fbgemm
def test_lm_head_wide_layers_stop_at_fewer_fp16_rows():
    for out_features, max_rows in [(cpu_gemm.VOCAB_OUTPUT_FEATURES - 1, cpu_gemm.MAX_FP16_ROWS),
                                   (cpu_gemm.VOCAB_OUTPUT_FEATURES, cpu_gemm.MAX_FP16_ROWS_VOCAB)]:  # fmt: skip
        w = (torch.randn(out_features, 32) * 0.1).to(torch.bfloat16)
        assert cpu_gemm._wide_linear(w).fp16.max_rows == max_rows


@needs_fbgemm
def test_fp16_copies_live_as_long_as_their_layer():
    """The op finds a layer's fp16 copy by the weight's address: the entry goes with the layer,
    so a later weight at the same address cannot meet a stale copy."""
    w = (torch.randn(OUT, IN) * 0.1).to(torch.bfloat16)
    gc.collect()  # earlier tests' layers
    before = len(cpu_gemm._FP16_COPIES)
    linear = cpu_gemm._wide_linear(w)
    assert cpu_gemm._FP16_COPIES[w.data_ptr()] is linear.fp16
    del linear
    gc.collect()
    assert w.data_ptr() not in cpu_gemm._FP16_COPIES and len(cpu_gemm._FP16_COPIES) == before


@needs_fbgemm
def test_weights_beyond_fp16_range_keep_the_fp32_gemm():
    w = (torch.randn(OUT, IN) * 0.1).to(torch.bfloat16)
    w[3, 5] = 70000.0
    linear = cpu_gemm._wide_linear(w)
    assert not hasattr(linear, "fp16") and w.data_ptr() not in cpu_gemm._FP16_COPIES
    x = torch.randn(4, IN).to(torch.bfloat16)
    torch.testing.assert_close(linear(x, w, None).float(), _fp32_product(x, w, None).float(), rtol=2**-7, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 3, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_narrow_linear_equals_the_fp32_product_of_the_bf16_values(rows, with_bias):
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, IN, generator=gen).to(torch.bfloat16)
    w = (torch.randn(16, IN, generator=gen) * 0.1).to(torch.bfloat16)
    b = torch.randn(16, generator=gen).to(torch.bfloat16) if with_bias else None
    out = cpu_gemm._fp32_torch_linear(w)(x, w, b)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 16)
    torch.testing.assert_close(out.float(), _fp32_product(x, w, b).float(), rtol=2**-7, atol=1e-5)


def test_row_count_is_not_a_compile_guard():
    """Under torch.compile with dynamic rows the op is one opaque node: one graph serves a
    single row (bf16 GEMV) and many rows (oneDNN)."""
    w = (torch.randn(OUT, IN) * 0.1).to(torch.bfloat16)
    dnnl = ops.create_onednn_mm(w.float().t(), 8)

    def linear(x):
        return torch.ops.vllm_laguna.wide_bf16_linear(x, w, None, dnnl.handler_tensor, OUT) * 2

    compiled = torch.compile(linear, backend="eager", dynamic=True, fullgraph=True)
    for rows in (1, 7):
        x = torch.randn(rows, IN).to(torch.bfloat16)
        torch.testing.assert_close(compiled(x), linear(x), rtol=0, atol=0)


needs_the_hook = pytest.mark.skipif(
    cpu_gemm.onednn_has_bf16_matmul() or not ops._supports_onednn,
    reason="this CPU's oneDNN has a bf16 matmul (AVX-512/AMX): vLLM's own bf16 linears run, the hook is off",
)


def _hooked(model, kind: str = "dnnl") -> set[str]:
    """Names of the layers whose linear is oneDNN's (``dnnl``), has an fp16 copy (``fp16``) or is
    torch's fp32 (``weight32``)."""
    return {name for name, module in model.named_modules() if hasattr(getattr(module, "cpu_linear", None), kind)}


@pytest.fixture(scope="module")
def tiny_laguna_bf16(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna-bf16"), LagunaTiny(dtype="bfloat16"))


@needs_the_hook
def test_fp32_copies_are_made_only_where_they_fit_beside_the_kv_cache(
    process_group, tiny_laguna_bf16, monkeypatch
):
    """bf16 linears get an fp32 copy (4 bytes a weight; oneDNN's for wide outputs, torch's for
    narrow ones) when the copies take at most half of the memory available less an explicit KV
    cache; otherwise vLLM's dispatch stays, with a warning."""
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's platform turns it into bytes
    model, _ = load_model(tiny_laguna_bf16, dtype="bfloat16")
    hooked = _hooked(model)
    layers = LagunaTiny().num_layers
    # oneDNN: qkv (384 wide), the dense MLP's gate_up (192) and the LM head (512)
    assert hooked == {f"model.layers.{i}.self_attn.qkv_proj" for i in range(layers)} | {
        "model.layers.0.mlp.gate_up_proj",
        "lm_head",
    }
    # torch fp32: o_proj and down_proj (64 wide), per-head gates (8), routers (8) and the
    # shared experts' gate_up (64)
    narrow = _hooked(model, "weight32")
    attention = {f"model.layers.{i}.self_attn.{name}" for i in range(layers) for name in ("o_proj", "g_proj")}
    mlp = {"model.layers.0.mlp.down_proj"} | {
        f"model.layers.{i}.mlp.{name}"
        for i in range(1, layers)
        for name in ("gate", "shared_expert.gate_up_proj", "shared_expert.down_proj")
    }
    assert narrow == attention | mlp
    # FBGEMM's fp16 copies (2 bytes a weight more) beside the wide layers' fp32 ones
    fp16 = _hooked(model, "fp16")
    assert fp16 == (hooked if cpu_gemm.fbgemm_available() else set())
    modules = dict(model.named_modules())
    needed = sum(4 * modules[name].weight.numel() for name in hooked | narrow)
    needed += sum(2 * modules[name].weight.numel() for name in fp16)

    warnings = []
    monkeypatch.setattr(cpu_gemm.logger, "warning", lambda msg, *args: warnings.append(msg % args))
    kv_cache = 2**30
    monkeypatch.setattr(cpu_gemm.psutil, "virtual_memory", lambda: SimpleNamespace(available=kv_cache + 2 * needed))
    model = load_model(tiny_laguna_bf16, dtype="bfloat16")[0]
    assert (_hooked(model), _hooked(model, "weight32")) == (hooked, narrow)
    assert warnings == []
    monkeypatch.setattr(cpu_gemm.psutil, "virtual_memory", lambda: SimpleNamespace(available=kv_cache + 2 * needed - 2))
    model = load_model(tiny_laguna_bf16, dtype="bfloat16")[0]
    assert (_hooked(model), _hooked(model, "weight32")) == (set(), set())
    assert len(warnings) == 1 and "VLLM_CPU_KVCACHE_SPACE" in warnings[0]


def test_each_parallel_rank_counts_its_part_of_the_memory(monkeypatch):
    """The ranks of a TP/PP engine make their copies side by side on one machine: each may
    count on its share of the available memory, less its own explicit KV cache."""
    from vllm.config import CacheConfig, ParallelConfig, VllmConfig, set_current_vllm_config

    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)  # vLLM's platform would size the cache from it
    monkeypatch.setattr(cpu_gemm.psutil, "virtual_memory", lambda: SimpleNamespace(available=10 * 2**30))
    for ranks, kv_cache, left in [(1, None, 10 * 2**30), (2, None, 5 * 2**30), (2, 2**30, 4 * 2**30)]:
        config = VllmConfig(
            parallel_config=ParallelConfig(tensor_parallel_size=ranks),
            cache_config=CacheConfig(kv_cache_memory_bytes=kv_cache),
        )
        with set_current_vllm_config(config):
            assert cpu_gemm._memory_left_for_copies() == left
