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
experts as LoRA targets there. The engines use ``max_loras=2`` with one adapter: vLLM 0.32's
CPU LoRA ops give requests without an adapter the adapter in the *last* slot when both share
a batch (they index the stacked weights with the no-adapter id -1; vLLM PR #48421), so the
last slot must stay empty.

Without an engine (``loaded_models``): the refusal, the CPU experts kept when LoRA leaves the
experts out, and the expert names vLLM's LoRA manager would pack on CUDA.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from harness import Greedy, assert_parity, hf_model_greedy, max_logprob_gap, prompts_for, shutdown, start_engine
from loaded_models import load_model, process_group  # noqa: F401 (fixture)
from lora_adapters import build_peft_adapter
from vllm_laguna.model_executor.layers.experts import ExpertsLoRAUnsupported
from vllm_laguna.tiny.laguna import build_laguna
from vllm_laguna.tiny.lfm2 import build_lfm2
from vllm_laguna.tiny.llama4 import build_llama4

#: per model: a short prompt and one longer than Laguna's sliding window (16) or Llama 4's
#: attention chunk (128)
PROMPT_LENGTHS = {"laguna": [5, 40], "lfm2": [5, 40], "llama4": [5, 150]}
RANK = 8

LAGUNA_TARGETS = [
    *("q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"),
    *("embed_tokens", "lm_head"),  # vLLM's embedding_modules
]
LLAMA4_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: model -> (tiny builder, peft target_modules, vLLM lora_target_modules)
CASES = {
    # attention with its output gate; dense layer 0 and the shared experts' SwiGLU; the
    # token embedding and the LM head
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
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    build, peft_targets, vllm_targets = CASES[request.param]
    prompts = prompts_for(512, PROMPT_LENGTHS[request.param], seed=3)
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build(root / "ckpt")
    adapter = root / "adapter"
    peft_model = build_peft_adapter(ckpt, adapter, peft_targets, rank=RANK)
    hf_lora = hf_model_greedy(peft_model, prompts)
    with peft_model.disable_adapter():
        hf_base = hf_model_greedy(peft_model, prompts)
    del peft_model

    llm = start_engine(ckpt, enable_lora=True, max_lora_rank=RANK, max_loras=2, lora_target_modules=vllm_targets)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
        lora = LoRARequest("adapter", 1, str(adapter))
        requests = [{"prompt_token_ids": p} for p in prompts] * 2
        lora_requests = [None] * len(prompts) + [lora] * len(prompts)
        outputs = llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)
    finally:
        shutdown(llm)
    greedy = [Greedy.from_output(o) for o in outputs]
    return dict(hf_base=hf_base, hf_lora=hf_lora, vllm_base=greedy[: len(prompts)], vllm_lora=greedy[len(prompts) :])


def test_adapter_changes_the_reference(run):
    """The adapter matters: transformers' output moves with it (else parity proves nothing)."""
    assert max(max_logprob_gap(a, b) for a, b in zip(run["hf_base"], run["hf_lora"])) > 0.05


def test_adapter_matches_peft(run, record_property):
    record_property("max_logprob_gap", assert_parity(run["hf_lora"], run["vllm_lora"]))


def test_requests_without_adapter_match_base_model(run, record_property):
    """Same engine, same batch: requests without a LoRARequest see the base model."""
    record_property("max_logprob_gap", assert_parity(run["hf_base"], run["vllm_base"]))


# -- without an engine ------------------------------------------------------------------------

MOE_BUILDERS = {"laguna": build_laguna, "llama4": build_llama4}
NUM_EXPERTS = 8  # both tiny builders' default


@pytest.fixture(scope="module", params=list(MOE_BUILDERS))
def moe_checkpoint(request, tmp_path_factory):
    return MOE_BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.mark.parametrize("targets", [None, ["q_proj", "experts"]], ids=["all-modules", "experts-named"])
def test_experts_as_lora_targets_are_refused_on_cpu(process_group, moe_checkpoint, targets):
    from vllm.config import LoRAConfig

    with pytest.raises(ExpertsLoRAUnsupported, match=r"set lora_target_modules .* without 'experts'"):
        load_model(moe_checkpoint, lora_config=LoRAConfig(max_lora_rank=RANK, target_modules=targets))


def test_moe_layers_keep_cpu_experts_when_lora_leaves_experts_out(process_group, moe_checkpoint):
    """vLLM would pick its Triton MoE-LoRA experts for every MoE layer once LoRA is on."""
    from vllm.config import LoRAConfig
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    lora_config = LoRAConfig(max_lora_rank=RANK, target_modules=["q_proj", "o_proj"])
    model, vllm_config = load_model(moe_checkpoint, lora_config=lora_config)
    assert vllm_config.lora_config is lora_config
    assert model.moe_layers
    for runner in model.moe_layers:
        assert runner.routed_experts.quant_method.unquantized_backend == UnquantizedMoeBackend.CPU


def test_expert_lora_names_for_cuda(process_group, moe_checkpoint, tmp_path):
    """Where experts take LoRA (CUDA/ROCm), vLLM wraps each MoE layer in FusedMoEWithLoRA and
    packs the adapter's per-expert modules ``experts.{e}.{gate,up,down}_proj`` into it. Here:
    the names vLLM derives from our model, and a per-expert adapter read by vLLM's LoRA loader
    the way its worker reads one, landing on exactly those names."""
    from vllm.config import LoRAConfig
    from vllm.lora.layers import FusedMoEWithLoRA
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import get_supported_lora_modules, process_packed_modules_mapping

    model, _ = load_model(moe_checkpoint)
    supported = get_supported_lora_modules(model)
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "experts", "embed_tokens", "lm_head"} <= set(supported)
    packed = process_packed_modules_mapping(model)
    per_expert = {f"experts.{e}.{p}" for e in range(NUM_EXPERTS) for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(packed["experts"]) == per_expert
    runner = model.moe_layers[0]
    assert FusedMoEWithLoRA.can_replace_layer(runner, LoRAConfig(max_lora_rank=RANK), ["w1", "w3"], model.config)

    # a per-expert adapter on the first MoE layer, as vLLM's worker loads it
    layer = next(name for name, module in model.named_modules() if module is runner)
    hidden, inner = runner.moe_config.hidden_dim, runner.moe_config.intermediate_size_per_partition
    shapes = {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    tensors = {}
    for e in range(NUM_EXPERTS):
        for proj, (out, inp) in shapes.items():
            name = f"base_model.model.{layer}.{e}.{proj}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(RANK, inp)
            tensors[f"{name}.lora_B.weight"] = torch.randn(out, RANK)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(shapes)})
    )
    expected = {"experts"} | {child for module in supported for child in packed.get(module, [module])}
    adapter = LoRAModel.from_local_checkpoint(
        str(tmp_path),
        expected,
        PEFTHelper.from_local_dir(str(tmp_path), 4096),
        lora_model_id=1,
        device="cpu",
        weights_mapper=model.hf_to_vllm_mapper.get_rename_mapper(),
    )
    # the LoRA manager packs "{parent of the MoE layer}.{packed name}" into the layer's wrapper
    parent = layer.rpartition(".")[0]
    assert set(adapter.loras) == {f"{parent}.{name}" for name in packed["experts"]}


def test_lfm2_w2_as_lora_target_is_named_down_proj(process_group, tmp_path):
    """vLLM matches lora_target_modules against module names; ours for w2 is down_proj, and a
    target matching nothing would leave w2 without its adapter silently."""
    from vllm.config import LoRAConfig

    with pytest.raises(ValueError, match=r"name down_proj instead of w2"):
        load_model(build_lfm2(tmp_path / "ckpt"), lora_config=LoRAConfig(max_lora_rank=RANK, target_modules=["w1", "w2"]))
