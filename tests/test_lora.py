"""LoRA (vLLM's ``SupportsLoRA``) against transformers + peft, fp32 on vLLM's CPU backend.

For each model, a peft adapter with random nonzero ``lora_B`` on its attention and dense-MLP
projections (and the shared experts, and LFM2's conv projections) is loaded into one engine
through a
``LoRARequest``; each prompt runs once with the adapter and once without, in one batch.
Both must equal transformers (the peft model that saved the adapter, with the adapter on and
off; see ``lora_adapters``) by ``harness.assert_parity``: identical greedy tokens, top-5
logprobs within ``LOGPROB_ATOL`` (1e-3).

Laguna and Llama 4 pass ``lora_target_modules`` without the experts: on the CPU backend vLLM
has no MoE-LoRA kernel, and :mod:`vllm_laguna.model_executor.layers.experts` refuses
experts as LoRA targets there (tested below).
"""

from __future__ import annotations

import pytest

from harness import Greedy, assert_parity, engine_kwargs, hf_model_greedy, max_logprob_gap, prompts_for, shutdown
from lora_adapters import build_peft_adapter
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.lfm2 import build_lfm2
from vllm_laguna.tiny.llama4 import build_llama4

# longer than Laguna's sliding window (16) and Llama 4's attention chunk (128)
PROMPTS = prompts_for(512, [5, 40, 150], seed=3)
RANK = 8

LAGUNA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA4_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: model -> (tiny builder, peft target_modules, vLLM lora_target_modules)
CASES = {
    # attention with its output gate; dense layer 0 and the shared experts' SwiGLU
    "laguna": (build_laguna, LAGUNA_TARGETS, LAGUNA_TARGETS),
    # attention, both conv projections (in_proj is three slices in vLLM), the SwiGLU;
    # no MoE, so no target restriction
    "lfm2": (build_lfm2, ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"], None),
    # attention, dense layers and shared experts (peft cannot wrap transformers' Llama 4
    # router: its forward returns a tuple)
    "llama4": (build_llama4, LLAMA4_TARGETS, LLAMA4_TARGETS),
}


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    """Checkpoint, adapter, transformers with and without it, and one vLLM engine's batch
    of every prompt with and without it."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    build, peft_targets, vllm_targets = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build(root / "ckpt")
    adapter = root / "adapter"
    peft_model = build_peft_adapter(ckpt, adapter, peft_targets, rank=RANK)
    hf_lora = hf_model_greedy(peft_model, PROMPTS)
    with peft_model.disable_adapter():
        hf_base = hf_model_greedy(peft_model, PROMPTS)
    del peft_model

    llm = LLM(
        **engine_kwargs(ckpt, enable_lora=True, max_lora_rank=RANK, max_loras=2, lora_target_modules=vllm_targets)
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
        lora = LoRARequest("adapter", 1, str(adapter))
        prompts = [{"prompt_token_ids": p} for p in PROMPTS] * 2
        outputs = llm.generate(prompts, params, lora_request=[None] * len(PROMPTS) + [lora] * len(PROMPTS), use_tqdm=False)
    finally:
        shutdown(llm)
    greedy = [Greedy.from_output(o) for o in outputs]
    return dict(hf_base=hf_base, hf_lora=hf_lora, vllm_base=greedy[: len(PROMPTS)], vllm_lora=greedy[len(PROMPTS) :])


def test_adapter_changes_the_reference(run):
    """The adapter matters: transformers' output moves with it (else parity proves nothing)."""
    assert max(max_logprob_gap(a, b) for a, b in zip(run["hf_base"], run["hf_lora"])) > 0.05


def test_adapter_matches_peft(run):
    assert_parity(run["hf_lora"], run["vllm_lora"])


def test_requests_without_adapter_match_base_model(run):
    """Same engine, same batch: requests without a LoRARequest see the base model."""
    assert_parity(run["hf_base"], run["vllm_base"])
