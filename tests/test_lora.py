"""LoRA (vLLM's ``SupportsLoRA``) against transformers + peft, fp32 on vLLM's CPU backend.

For each model, a peft adapter with random nonzero ``lora_B`` on its attention and dense-MLP
projections (and the shared experts, and LFM2's conv projections) is loaded into one engine
through a
``LoRARequest``; each prompt runs once with the adapter and once without, in one batch.
Both must equal transformers (the peft model that saved the adapter, with the adapter on and
off; see ``lora_adapters``) by ``harness.assert_parity``: identical greedy tokens, top-5
logprobs within ``LOGPROB_ATOL`` (1e-3).

The engines run with vLLM's defaults (``enable_lora=True``, no ``lora_target_modules``). On
the CPU backend vLLM has no MoE-LoRA kernel, so for Laguna and Llama 4 the routed experts are
left out (:mod:`vllm_laguna.model_executor.layers.experts`): they keep vLLM's CPU experts, and
an adapter carrying routed-expert weights (peft's ``target_parameters`` on the fused experts)
is refused by ``add_lora``, naming those modules, while the engine goes on serving. The
engines use ``max_loras=2`` with one adapter: vLLM 0.32's CPU LoRA ops give requests without
an adapter the adapter in the *last* slot when both share a batch (they index the stacked
weights with the no-adapter id -1; vLLM PR #48421), so the last slot must stay empty.

Without an engine (``loaded_models``): experts named as targets refused at start, the CPU
experts kept with LoRA on, vLLM's LoRA manager (built as its worker builds it) wrapping
everything but the routed experts and refusing a per-expert adapter, and the expert names it
would pack on CUDA.
"""

from __future__ import annotations

import json
from pathlib import Path

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

#: model -> (tiny builder, peft target_modules)
CASES = {
    # attention with its output gate; dense layer 0 and the shared experts' SwiGLU; the
    # token embedding and the LM head (vLLM's embedding_modules)
    "laguna": (
        build_laguna,
        ["q_proj", "k_proj", "v_proj", "o_proj", "g_proj", "gate_proj", "up_proj", "down_proj"]
        + ["embed_tokens", "lm_head"],
    ),
    # attention, both conv projections (in_proj is three slices in vLLM), the SwiGLU
    "lfm2": (build_lfm2, ["q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"]),
    # attention, dense layers and shared experts (peft cannot wrap transformers' Llama 4
    # router: its forward returns a tuple)
    "llama4": (build_llama4, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
#: MoE model -> transformers' fused routed-expert parameters (peft ``target_parameters``)
ROUTED_EXPERT_PARAMETERS = {
    "laguna": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    "llama4": ["feed_forward.experts.gate_up_proj", "feed_forward.experts.down_proj"],
}


@pytest.fixture(scope="module", params=list(CASES))
def run(request, tmp_path_factory):
    """Checkpoint, adapter, transformers with and without it, and one vLLM engine's batch
    of every prompt with and without it. For a MoE model, first: what the engine's
    ``add_lora`` raised for an adapter on attention and the routed experts."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    build, peft_targets = CASES[request.param]
    prompts = prompts_for(512, PROMPT_LENGTHS[request.param], seed=3)
    root = tmp_path_factory.mktemp(request.param)
    ckpt = build(root / "ckpt")
    adapter = root / "adapter"
    peft_model = build_peft_adapter(ckpt, adapter, peft_targets, rank=RANK)
    hf_lora = hf_model_greedy(peft_model, prompts)
    with peft_model.disable_adapter():
        hf_base = hf_model_greedy(peft_model, prompts)
    del peft_model
    expert_adapter = None
    if request.param in ROUTED_EXPERT_PARAMETERS:
        expert_adapter = root / "expert_adapter"
        build_peft_adapter(
            ckpt, expert_adapter, ["q_proj"], rank=RANK, target_parameters=ROUTED_EXPERT_PARAMETERS[request.param]
        )

    llm = start_engine(ckpt, enable_lora=True, max_lora_rank=RANK, max_loras=2)
    try:
        expert_adapter_error = None
        if expert_adapter is not None:
            expert_adapter_error = add_lora_error(llm, LoRARequest("experts", 2, str(expert_adapter)))
        params = SamplingParams(temperature=0.0, max_tokens=32, logprobs=5, ignore_eos=True)
        lora = LoRARequest("adapter", 1, str(adapter))
        requests = [{"prompt_token_ids": p} for p in prompts] * 2
        lora_requests = [None] * len(prompts) + [lora] * len(prompts)
        outputs = llm.generate(requests, params, lora_request=lora_requests, use_tqdm=False)
    finally:
        shutdown(llm)
    greedy = [Greedy.from_output(o) for o in outputs]
    return dict(
        hf_base=hf_base,
        hf_lora=hf_lora,
        vllm_base=greedy[: len(prompts)],
        vllm_lora=greedy[len(prompts) :],
        expert_adapter=expert_adapter,
        expert_adapter_error=expert_adapter_error,
    )


def add_lora_error(llm, lora_request) -> Exception | None:
    """What the engine's ``add_lora`` raised for ``lora_request``; ``None`` if it took it."""
    try:
        llm.llm_engine.add_lora(lora_request)
    except Exception as error:
        return error
    return None


def test_adapter_changes_the_reference(run):
    """The adapter matters: transformers' output moves with it (else parity proves nothing)."""
    assert max(max_logprob_gap(a, b) for a, b in zip(run["hf_base"], run["hf_lora"])) > 0.05


def test_adapter_matches_peft(run, record_property):
    record_property("max_logprob_gap", assert_parity(run["hf_lora"], run["vllm_lora"]))


def test_requests_without_adapter_match_base_model(run, record_property):
    """Same engine, same batch: requests without a LoRARequest see the base model."""
    record_property("max_logprob_gap", assert_parity(run["hf_base"], run["vllm_base"]))


def adapter_modules_under(adapter_dir: Path, marker: str) -> set[str]:
    """The module names (as vLLM reports them: no ``base_model.model.``, no ``.base_layer``) of
    the adapter's tensors whose names contain ``marker``."""
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
        names = [key for key in f.keys() if marker in key]
    return {key.removeprefix("base_model.model.").partition(".lora_")[0].removesuffix(".base_layer") for key in names}


def test_adapter_with_routed_expert_weights_is_refused_naming_them(run):
    """vLLM on CPU runs no LoRA on the routed experts: an adapter carrying their weights is
    refused when it is loaded, every routed-expert module named, rather than served without
    them (the engine then serves the other adapter: the parity tests above)."""
    if run["expert_adapter"] is None:
        pytest.skip("no routed experts")
    refusal = run["expert_adapter_error"]
    assert isinstance(refusal, ValueError), refusal
    expert_modules = adapter_modules_under(run["expert_adapter"], ".experts.")
    assert expert_modules
    for module in expert_modules:
        assert f"'{module}'" in str(refusal)
    assert ".q_proj'" not in str(refusal)  # the attention modules are not what is refused


# -- without an engine ------------------------------------------------------------------------

MOE_BUILDERS = {"laguna": build_laguna, "llama4": build_llama4}
NUM_EXPERTS = 8  # both tiny builders' default


@pytest.fixture(scope="module", params=list(MOE_BUILDERS))
def moe_checkpoint(request, tmp_path_factory):
    return MOE_BUILDERS[request.param](tmp_path_factory.mktemp(request.param) / "ckpt")


@pytest.mark.parametrize("targets", [["q_proj", "experts"], ["o_proj", "experts.0.down_proj"]])
def test_experts_as_lora_targets_are_refused_on_cpu(process_group, moe_checkpoint, targets):
    from vllm.config import LoRAConfig

    with pytest.raises(ExpertsLoRAUnsupported, match=r"names the fused-MoE experts .* leave lora_target_modules"):
        load_model(moe_checkpoint, lora_config=LoRAConfig(max_lora_rank=RANK, target_modules=targets))


@pytest.mark.parametrize("targets", [None, ["q_proj", "o_proj"]], ids=["default", "listed"])
def test_moe_layers_keep_cpu_experts_with_lora(process_group, moe_checkpoint, targets):
    """vLLM would pick its Triton MoE-LoRA experts for every MoE layer once LoRA is on. An
    unset target list becomes every module vLLM would wrap but the routed experts; a list
    stays the user's."""
    from vllm.config import LoRAConfig
    from vllm.lora.utils import get_supported_lora_modules
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    lora_config = LoRAConfig(max_lora_rank=RANK, target_modules=targets)
    model, vllm_config = load_model(moe_checkpoint, lora_config=lora_config)
    assert vllm_config.lora_config is lora_config
    assert model.moe_layers
    for runner in model.moe_layers:
        assert runner.routed_experts.quant_method.unquantized_backend == UnquantizedMoeBackend.CPU
    expected = sorted(set(get_supported_lora_modules(model)) - {"experts"}) if targets is None else targets
    assert lora_config.target_modules == expected


def test_lora_manager_wraps_all_but_routed_experts_and_refuses_their_adapter(process_group, moe_checkpoint, tmp_path):
    """vLLM's LoRA manager, made as vLLM's worker makes it, with ``lora_target_modules`` unset:
    attention, dense MLP, shared experts, router, embedding and LM head wrapped, the routed
    experts not (no ``FusedMoEWithLoRA``, which would need Triton); a per-expert adapter (vLLM's
    2D MoE format) refused by the worker's loader, every expert module named."""
    from vllm.config import LoRAConfig, set_current_vllm_config
    from vllm.lora.layers import FusedMoEWithLoRA
    from vllm.lora.request import LoRARequest
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    model, vllm_config = load_model(moe_checkpoint, lora_config=LoRAConfig(max_lora_rank=RANK))
    worker = LRUCacheWorkerLoRAManager(vllm_config, torch.device("cpu"), model.embedding_modules)
    with set_current_vllm_config(vllm_config):
        worker.create_lora_manager(model, vllm_config)
    wrapped = {name.rpartition(".")[2] for name in model.lora_manager.modules}
    assert {"qkv_proj", "o_proj", "gate_up_proj", "down_proj", "embed_tokens", "lm_head"} <= wrapped
    assert "experts" not in wrapped
    assert any(".shared_expert." in name for name in model.lora_manager.modules)
    assert not any(isinstance(module, FusedMoEWithLoRA) for module in model.modules())

    expert_modules = write_per_expert_adapter(model, model.moe_layers[0], tmp_path)
    with pytest.raises(ValueError) as refusal:
        worker.add_adapter(LoRARequest("experts", 1, str(tmp_path)))
    for module in expert_modules:
        assert f"'{module}'" in str(refusal.value)


def write_per_expert_adapter(model, runner, adapter_dir: Path) -> set[str]:
    """A LoRA adapter (safetensors and ``adapter_config.json``) on every expert of the MoE layer
    ``runner`` in vLLM's per-expert (2D) MoE format, ``{layer}.{e}.{gate,up,down}_proj``;
    returns those module names."""
    layer = next(name for name, module in model.named_modules() if module is runner)
    hidden, inner = runner.moe_config.hidden_dim, runner.moe_config.intermediate_size_per_partition
    shapes = {"gate_proj": (inner, hidden), "up_proj": (inner, hidden), "down_proj": (hidden, inner)}
    modules = {f"{layer}.{e}.{proj}" for e in range(NUM_EXPERTS) for proj in shapes}
    tensors = {}
    for module in modules:
        out, inp = shapes[module.rpartition(".")[2]]
        tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(RANK, inp)
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out, RANK)
    save_file(tensors, adapter_dir / "adapter_model.safetensors")
    (adapter_dir / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": list(shapes)})
    )
    return modules


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
    write_per_expert_adapter(model, runner, tmp_path)
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
    layer = next(name for name, module in model.named_modules() if module is runner)
    parent = layer.rpartition(".")[0]
    assert set(adapter.loras) == {f"{parent}.{name}" for name in packed["experts"]}


def test_lfm2_w2_as_lora_target_is_named_down_proj(process_group, tmp_path):
    """vLLM matches lora_target_modules against module names; ours for w2 is down_proj, and a
    target matching nothing would leave w2 without its adapter silently."""
    from vllm.config import LoRAConfig

    with pytest.raises(ValueError, match=r"name down_proj instead of w2"):
        load_model(build_lfm2(tmp_path / "ckpt"), lora_config=LoRAConfig(max_lora_rank=RANK, target_modules=["w1", "w2"]))
