"""Speculative decoding on vLLM's CPU backend with this package's targets: greedy output with
speculation is transformers' greedy output (tokens and top-5 logprobs), and the drafter
really ran (its acceptance counters are printed and recorded).

* DFlash on Laguna, with this package's ``DFlashLagunaForCausalLM`` drafter: a random tiny
  drafter (it accepts next to nothing, which must not change the output), and a hand-set
  target/drafter pair (``tiny/dflash_oracle.py``) whose first draft is right by construction:
  every first draft accepted shows the target's aux hidden states, ``fc`` and the drafter's
  context K/V are right.
* EAGLE-3 (vLLM's Llama-style EAGLE-3 head) on Laguna and Llama 4 text.
* n-gram on Laguna (random, and the cycle target, where the prompt predicts everything) and
  Llama 4. LFM2 refuses speculation by name (see the README for why).

vLLM 0.32's CPU backend runs all of these (it maps the EAGLE/DFlash input-preparation
kernels to CPU code and its attention does non-causal and sliding-window queries).
"""

from __future__ import annotations

import pytest

import torch

from harness import assert_parity, hf_greedy, load_error, prompts_for, shutdown, start_engine, vllm_spec_run
from vllm_laguna.tiny.dflash_oracle import build_dflash_oracle, cycle_prompts, successor
from vllm_laguna.tiny.eagle3 import build_eagle3
from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna, build_laguna_dflash
from vllm_laguna.tiny.lfm2 import build_lfm2
from vllm_laguna.tiny.llama4 import build_llama4

#: random prompts, one longer than Laguna's sliding window (16), one repeating itself
PROMPTS = prompts_for(512, [5, 23, 40], seed=7) + [prompts_for(512, [6], seed=8)[0] * 4]
NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 2, "prompt_lookup_max": 4}


@pytest.fixture
def ngram_in_own_process(monkeypatch):
    """n-gram engines run their engine core in a process of their own: vLLM's n-gram proposer
    imports numba (llvmlite), after which every later engine start in the same process dies
    in vLLM's kernel-override scan of ``sys.modules`` (``vllm/triton_utils/dispatcher.py``:
    llvmlite's ``ffi.lib`` answers ``vars()`` with a function wrapper)."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")


def report(record_property, name: str, stats) -> None:
    print(f"{name}: {stats}")
    record_property(f"{name} acceptance", str(stats))


@pytest.fixture(scope="module")
def laguna(tmp_path_factory):
    return build_laguna(tmp_path_factory.mktemp("laguna") / "target")


@pytest.fixture(scope="module")
def laguna_reference(laguna):
    return hf_greedy(laguna, PROMPTS)


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return build_llama4(tmp_path_factory.mktemp("llama4") / "target")


@pytest.fixture(scope="module")
def llama4_reference(llama4):
    return hf_greedy(llama4, PROMPTS)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    return build_dflash_oracle(tmp_path_factory.mktemp("oracle"))


AUX_LAYERS = (1, 2, 3)


def capture_aux_hidden_states(model):
    """Ask the target for aux hidden states as a drafter would, and keep them from the
    engine (which runs no drafter here) with a forward hook that returns the hidden states."""
    model.set_aux_hidden_state_layers(AUX_LAYERS)
    model.captured = []

    def keep_aux(module, args, output):
        hidden, aux = output
        model.captured.append([h.clone() for h in aux])
        return hidden

    model.register_forward_hook(keep_aux)  # on the outer model: vLLM calls DecoderModel.forward directly


@pytest.mark.parametrize("target", ["laguna", "llama4"])
def test_aux_hidden_states_are_the_residual_stream(target, request):
    """SupportsEagle3: aux state ``i`` is the residual stream entering layer ``i``, which is
    transformers' ``hidden_states[i]``."""
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    checkpoint = request.getfixturevalue(target)
    prompt = PROMPTS[2]
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32)
        expected = hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    llm = start_engine(checkpoint)
    try:
        llm.apply_model(capture_aux_hidden_states)
        llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
        prefill = llm.apply_model(lambda model: model.captured[0])[0]
    finally:
        shutdown(llm)
    assert len(prefill) == len(AUX_LAYERS)
    for layer, ours in zip(AUX_LAYERS, prefill):
        torch.testing.assert_close(ours[: len(prompt)], expected[layer][0], rtol=1e-4, atol=1e-4)


def test_dflash_random_drafter_keeps_greedy_output(laguna, laguna_reference, tmp_path, record_property):
    drafter = build_laguna_dflash(tmp_path / "drafter")
    spec = {"method": "dflash", "model": str(drafter), "num_speculative_tokens": 3}
    actual, stats = vllm_spec_run(laguna, PROMPTS, spec)
    report(record_property, "DFlash (random drafter)", stats)
    assert stats.num_drafts > 0
    assert_parity(laguna_reference, actual)


def test_dflash_first_draft_always_accepted(oracle, record_property):
    """The hand-set pair: every first draft is right, so acceptance at position 0 is 100%."""
    target, drafter = oracle
    prompts = cycle_prompts([3, 9, 20])
    spec = {"method": "dflash", "model": str(drafter), "num_speculative_tokens": 3}
    actual, stats = vllm_spec_run(target, prompts, spec, max_new_tokens=20)
    report(record_property, "DFlash (oracle drafter)", stats)
    for prompt, greedy in zip(prompts, actual):
        expected = [prompt[-1]]
        for _ in range(20):
            expected.append(successor(expected[-1]))
        assert greedy.tokens == expected[1:]
    assert stats.num_drafts > 0
    assert stats.accepted_per_position[0] == stats.num_drafts


def test_dflash_drafter_split_over_kv_cache_groups_refused_at_load(tmp_path):
    """A 3-layer drafter on a 2 full + 4 sliding target, with its own K/V shape (head_dim 64,
    the target's 32), would have its layers in two KV-cache groups: vLLM stopped in the worker
    on "All drafting layers should belong to the same kv cache group" after profiling; the
    drafter refuses at construction, naming the layer counts that fit (1 to 2)."""
    target = LagunaTiny(
        num_layers=6,
        heads_per_layer=[4] * 6,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"] * 2,
        mlp_layer_types=["dense"] + ["sparse"] * 5,
    )
    checkpoint = build_laguna(tmp_path / "target", target)
    drafter = build_laguna_dflash(tmp_path / "drafter", target, num_layers=3, target_layer_ids=[0, 2, 4], head_dim=64)
    spec = {"method": "dflash", "model": str(drafter), "num_speculative_tokens": 3}
    message = load_error(checkpoint, "float32", speculative_config=spec)
    refusal = "ConfigError: Laguna DFlash drafter config field `num_hidden_layers`: expected 1 to 2 drafter layers"
    assert refusal in message
    assert "(2 full_attention + 4 sliding_attention layers)" in message
    assert "All drafting layers" not in message


def test_ngram_laguna_keeps_greedy_output(laguna, laguna_reference, record_property, ngram_in_own_process):
    """Drafts from the prompt (PROMPTS ends with one that repeats itself) are accepted, and
    the output is still exactly the target's."""
    actual, stats = vllm_spec_run(laguna, PROMPTS, NGRAM)
    report(record_property, "n-gram Laguna", stats)
    assert sum(stats.accepted_per_position) > 0
    assert_parity(laguna_reference, actual)


@pytest.mark.parametrize(("target", "name"), [("laguna", "Laguna"), ("llama4", "Llama 4")])
def test_eagle3_keeps_greedy_output(target, name, request, tmp_path, record_property):
    checkpoint, reference = request.getfixturevalue(target), request.getfixturevalue(f"{target}_reference")
    drafter = build_eagle3(tmp_path / "eagle3")
    spec = {"method": "eagle3", "model": str(drafter), "num_speculative_tokens": 3}
    actual, stats = vllm_spec_run(checkpoint, PROMPTS, spec)
    report(record_property, f"EAGLE-3 {name}", stats)
    assert stats.num_drafts > 0
    assert_parity(reference, actual)


def test_ngram_llama4_keeps_greedy_output(llama4, llama4_reference, record_property, ngram_in_own_process):
    actual, stats = vllm_spec_run(llama4, PROMPTS, NGRAM)
    report(record_property, "n-gram Llama 4", stats)
    assert stats.num_drafts > 0
    assert_parity(llama4_reference, actual)


def test_lfm2_refuses_speculation_by_name(tmp_path):
    """Any method (checked on the number of speculative tokens); EAGLE-3 here because its
    refusal surfaces in this process (an n-gram engine must run in its own, see above)."""
    checkpoint = build_lfm2(tmp_path / "lfm2")
    spec = {"method": "eagle3", "model": str(build_eagle3(tmp_path / "eagle3")), "num_speculative_tokens": 2}
    with pytest.raises(Exception, match="LFM2 conv layers .* do not support speculative decoding"):
        vllm_spec_run(checkpoint, PROMPTS[:1], spec, max_new_tokens=2)
