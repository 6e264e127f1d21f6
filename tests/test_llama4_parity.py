"""Llama 4 text in vLLM (this plugin) against transformers' Llama4ForCausalLM, fp32 on CPU.

Prompts of 5, 40, 150 and 290 tokens: two pass the attention chunk (128, the CPU block
size; 290 + 32 generated tokens crosses two chunk boundaries) and all pass ``floor_scale``
(16 in the tiny model, so attention temperature tuning changes q from position 15 on).
Every configuration checks 32 greedy tokens and the top-5 logprobs (``harness.assert_parity``).
"""

from __future__ import annotations

import pytest

from harness import assert_parity, hf_greedy, max_logprob_gap, prompts_for, vllm_greedy
from vllm_laguna.tiny.llama4 import Llama4Tiny, build_llama4

PROMPT_LENGTHS = [5, 40, 150, 290]
PROMPTS = prompts_for(512, PROMPT_LENGTHS)

# The default tiny model (see Llama4Tiny): top-1 MoE on layers 1 and 3, dense 0 and 2,
# q/k norm, RoPE/NoPE alternating from `no_rope_layers: []`, Llama 3 RoPE scaling.
TOP2 = dict(
    # top-2 routing (one row per token and choice), no q/k norm, MoE on every layer,
    # explicit no_rope_layers, plain RoPE
    top_k=2,
    use_qk_norm=False,
    interleave_moe_layer_step=1,
    no_rope_layers=[1, 1, 0, 1],
    rope_scaling=None,
    seed=1,
)


@pytest.fixture(scope="module")
def default_ckpt(tmp_path_factory):
    return build_llama4(tmp_path_factory.mktemp("llama4") / "default")


@pytest.fixture(scope="module")
def default_reference(default_ckpt):
    return hf_greedy(default_ckpt, PROMPTS)


@pytest.fixture(scope="module")
def default_batched(default_ckpt):
    return vllm_greedy(default_ckpt, PROMPTS)


def test_spec_defaults_cover_every_feature():
    """The default tiny spec is the feature-complete one the other tests vary."""
    spec = Llama4Tiny()
    assert spec.no_rope_layers == [] and spec.no_rope_layer_interval < spec.num_layers  # RoPE and NoPE
    assert spec.attention_chunk_size < max(PROMPT_LENGTHS) and spec.use_qk_norm
    assert spec.attn_temperature_tuning and spec.floor_scale < min(PROMPT_LENGTHS) + 32
    assert 1 < spec.interleave_moe_layer_step < spec.num_layers  # dense and MoE layers
    assert spec.rope_scaling["rope_type"] == "llama3"
    assert TOP2["top_k"] > 1 and not TOP2["use_qk_norm"]


def test_parity_top1_qk_norm(default_reference, default_batched):
    assert_parity(default_reference, default_batched)


def test_parity_top2_no_qk_norm(tmp_path):
    ckpt = build_llama4(tmp_path / "top2", **TOP2)
    assert_parity(hf_greedy(ckpt, PROMPTS), vllm_greedy(ckpt, PROMPTS))


def test_mixed_length_batch_equals_each_prompt_alone(default_ckpt, default_batched):
    """``max_num_seqs=1`` runs the prompts one at a time through the same engine."""
    alone = vllm_greedy(default_ckpt, PROMPTS, max_num_seqs=1)
    assert_parity(alone, default_batched, atol=1e-4)


@pytest.mark.parametrize(
    "layout",
    [
        # Llama4ForConditionalGeneration checkpoint: `language_model.` prefix, vision tensors
        dict(layout="multimodal"),
        # per-expert tensors, the layout of quantized checkpoints
        dict(expert_layout="per-expert"),
    ],
    ids=["multimodal", "per-expert"],
)
def test_other_checkpoint_layouts_load_the_same_model(tmp_path, layout, default_reference):
    """Same weights, other layouts on disk: vLLM on them equals transformers on the text layout."""
    ckpt = build_llama4(tmp_path / "ckpt", **layout)
    overrides = {"architectures": ["Llama4ForCausalLM"]} if layout.get("layout") == "multimodal" else None
    assert_parity(default_reference, vllm_greedy(ckpt, PROMPTS, hf_overrides=overrides))


@pytest.mark.parametrize(
    "change",
    [dict(attn_temperature_tuning=False), dict(attention_chunk_size=512)],
    ids=["temperature-tuning-off", "chunk-beyond-prompts"],
)
def test_features_change_the_reference(tmp_path, change, default_reference):
    """Temperature tuning and chunking matter on these prompts (transformers alone): a model
    that ignored either would fail the parity tests."""
    changed = hf_greedy(build_llama4(tmp_path / "changed", **change), PROMPTS[2:], max_new_tokens=2)
    assert max(max_logprob_gap(a, b) for a, b in zip(default_reference[2:], changed)) > 1e-2


def test_tensor_parallel_2(tmp_path, monkeypatch):
    """TP=2 on the CPU backend, one core per rank: heads, experts' and dense widths split;
    a single KV head (replicated); top-2 rows, reduced once with the shared expert."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    ckpt = build_llama4(tmp_path / "tp", **{**TOP2, "num_kv_heads": 1, "interleave_moe_layer_step": 2})
    prompts = PROMPTS[1:]
    expected = hf_greedy(ckpt, prompts)
    actual = vllm_greedy(ckpt, prompts, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert_parity(expected, actual)
