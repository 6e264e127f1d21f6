"""Every vLLM symbol this package uses, pinned in one place.

``PINS`` lists each ``module:Name`` that ``vllm_laguna`` imports from vLLM, with the members
of it the package relies on: keyword arguments it passes, attributes it reads, methods it
overrides. ``HOOKS`` lists the places where vLLM itself reads, by name, a hook this package
implements (a renamed hook would otherwise be silently ignored). A new vLLM that moves or
renames any of them fails here, naming it, before any model test does.

The tests check the pins three ways: every symbol imports from the installed vLLM (0.32);
every import in ``vllm_laguna`` is pinned (so the list cannot fall behind the code); and
every symbol and member resolves in a vLLM *source tree*, statically (``tests/vllm_source.py``).
The installed tree is always checked; more trees are checked when named in
``VLLM_SOURCE_TREES`` (``os.pathsep``-separated ``vllm`` package directories), which is how
vLLM 0.33, a CUDA-only wheel that cannot be installed on these machines, is checked from its
unpacked wheel::

    pip download --no-deps vllm==0.33.0 -d /tmp/vllm033 && (cd /tmp/vllm033 && unzip -q vllm-*.whl)
    VLLM_SOURCE_TREES=/tmp/vllm033/vllm python -m pytest tests/test_vllm_api.py

A member written ``name@0.33`` is required from that version on (a hook older vLLMs do not
call yet).
"""

from __future__ import annotations

import ast
import importlib
import os
import re
from pathlib import Path

import pytest

from vllm_source import SourceTree

PACKAGE = Path(__file__).resolve().parents[1] / "vllm_laguna"

_PROTOCOL = "vllm.entrypoints.generate.base.protocol"
_LINEAR = "vllm.model_executor.layers.linear"
_MAMBA_UTILS = "vllm.model_executor.layers.mamba.mamba_utils"

#: ``module:Name`` -> the members of it the package uses
PINS: dict[str, tuple[str, ...]] = {
    # plugin registration
    "vllm:ModelRegistry": ("register_model", "models"),
    "vllm.reasoning:ReasoningParserManager": ("register_lazy_module", "get_reasoning_parser"),
    "vllm.tool_parsers:ToolParserManager": ("register_lazy_module", "get_tool_parser"),
    # start-up checks: vLLM calls the class MODELS_CONFIG_MAP holds for the architecture
    "vllm.model_executor.models.config:MODELS_CONFIG_MAP": (),
    "vllm.model_executor.models.config:VerifyAndUpdateConfig": (
        "verify_and_update_config", "verify_and_update_model_config",
    ),
    "vllm.platforms:current_platform": (),
    "vllm.utils.cpu_resource_utils:get_allowed_cpu_list": (),
    "vllm.utils.cpu_resource_utils:get_visible_memory_node": (),
    "vllm.utils.cpu_resource_utils:get_memory_node_info": ("node_id",),
    "vllm.utils.cpu_resource_utils:MemoryNodeInfo": ("total_memory", "available_memory"),
    "vllm.utils.cpu_resource_utils:LogicalCPUInfo": ("numa_node",),
    # the environment report
    "vllm.plugins:DEFAULT_PLUGINS_GROUP": (),
    "vllm.plugins:load_general_plugins": (),
    "vllm.plugins:load_plugins_by_group": ("group",),
    "vllm.collect_env:run": ("command",),
    "vllm.collect_env:get_os": ("run_lambda",),
    "vllm.collect_env:get_python_platform": (),
    "vllm.collect_env:get_cpu_info": ("run_lambda",),
    "vllm.collect_env:get_nvidia_driver_version": ("run_lambda",),
    "vllm.collect_env:get_env_vars": (),
    "vllm.collect_env:get_pretty_env_info": (),
    # the demo
    "vllm:LLM": ("model", "chat", "apply_model", "get_tokenizer", "llm_engine"),
    "vllm.engine.arg_utils:EngineArgs": (  # LLM(**kwargs), and the start-up check tests
        "dtype", "enforce_eager", "max_model_len", "distributed_executor_backend", "gpu_memory_utilization",
        "kv_cache_memory_bytes", "reasoning_parser", "hf_overrides", "create_engine_config",
    ),
    "vllm:SamplingParams": ("temperature", "max_tokens"),
    # config objects the models read
    "vllm.config:VllmConfig": (
        "model_config", "cache_config", "quant_config", "parallel_config", "compilation_config",
        "num_speculative_tokens", "structured_outputs_config", "lora_config", "speculative_config",
        "scheduler_config",
    ),
    "vllm.config:SchedulerConfig": ("disable_hybrid_kv_cache_manager",),
    "vllm.config:ModelConfig": (
        "dtype", "hf_config", "hf_text_config", "architecture", "get_total_num_hidden_layers", "get_vocab_size",
        "get_hidden_size", "max_model_len",
    ),
    "vllm.config:CacheConfig": (
        "mamba_cache_dtype", "block_size", "kv_cache_memory_bytes", "gpu_memory_utilization", "cache_dtype",
    ),
    "vllm.config.structured_outputs:StructuredOutputsConfig": ("reasoning_parser",),
    "vllm.config.speculative:SpeculativeConfig": ("draft_model_config",),
    "vllm.config:get_current_vllm_config": (),
    "vllm.config.compilation:CompilationConfig": ("custom_ops", "splitting_ops", "static_forward_context"),
    "vllm.config.parallel:ParallelConfig": ("tensor_parallel_size", "enable_eplb", "eplb_config"),
    "vllm.config.parallel:EPLBConfig": ("num_redundant_experts",),
    "vllm.config.lora:LoRAConfig": ("target_modules",),
    "vllm.distributed:divide": (),
    "vllm.distributed:get_tensor_model_parallel_world_size": (),
    "vllm.distributed:get_pp_group": (),
    "vllm.distributed.parallel_state:GroupCoordinator": ("is_first_rank", "is_last_rank"),
    "vllm.compilation.decorators:support_torch_compile": (),
    "vllm.compilation.breakable_cudagraph:eager_break_during_capture": (),
    "vllm.forward_context:get_forward_context": (),
    "vllm.forward_context:ForwardContext": ("attn_metadata", "no_compile_layers"),
    "vllm.sequence:IntermediateTensors": (),
    "vllm.logger:init_logger": (),
    "vllm.utils.torch_utils:direct_register_custom_op": ("op_name", "op_func", "mutates_args", "fake_impl", "target_lib", "dispatch_key"),
    # layers
    "vllm.model_executor.layers.activation:SiluAndMul": (),
    "vllm.model_executor.layers.attention:Attention": (
        "num_heads", "head_size", "scale", "num_kv_heads", "cache_config", "quant_config",
        "per_layer_sliding_window", "prefix",
        # a DFlash drafter writes context K/V into its layers' caches itself
        "kv_cache", "impl", "layer_name", "sliding_window",
    ),
    "vllm.model_executor.layers.attention:ChunkedLocalAttention": ("attention_chunk_size",),
    # Attention passes `sinks=` through to the backend: the backends that run ours take it
    "vllm.v1.attention.backends.cpu_attn:CPUAttentionBackendImpl": ("sinks", "do_kv_cache_update"),
    "vllm.v1.attention.backends.flash_attn:FlashAttentionImpl": ("sinks", "do_kv_cache_update"),
    "vllm.model_executor.layers.layernorm:RMSNorm": ("hidden_size", "eps", "has_weight"),
    f"{_LINEAR}:ColumnParallelLinear": ("bias", "quant_config", "prefix", "weight_loader", "quant_method"),
    f"{_LINEAR}:MergedColumnParallelLinear": ("bias", "quant_config", "prefix"),
    f"{_LINEAR}:QKVParallelLinear": ("bias", "quant_config", "prefix"),
    f"{_LINEAR}:ReplicatedLinear": ("bias", "quant_config", "prefix", "return_bias"),
    f"{_LINEAR}:RowParallelLinear": ("bias", "quant_config", "prefix", "reduce_results"),
    f"{_LINEAR}:UnquantizedLinearMethod": (),
    # the CPU bf16 linear (layers/cpu_gemm.py): vLLM's oneDNN handler over an fp32 copy
    f"{_LINEAR}:LinearBase": ("quant_method",),
    "vllm.model_executor.layers.vocab_parallel_embedding:UnquantizedEmbeddingMethod": (),
    "vllm:_custom_ops": (),
    "vllm._custom_ops:_supports_onednn": (),
    "vllm._custom_ops:create_onednn_mm": (),
    "vllm.model_executor.layers.logits_processor:LogitsProcessor": ("vocab_size",),
    "vllm.model_executor.layers.quantization:QuantizationConfig": (),
    "vllm.model_executor.layers.rotary_embedding:get_rope": (
        "head_size", "max_position", "is_neox_style", "rope_parameters",
    ),
    "vllm.model_executor.layers.vocab_parallel_embedding:ParallelLMHead": ("quant_config", "prefix", "tie_weights"),
    "vllm.model_executor.layers.vocab_parallel_embedding:VocabParallelEmbedding": (
        "num_embeddings", "embedding_dim", "prefix",
    ),
    # fused MoE with our routers
    "vllm.model_executor.layers.fused_moe:FusedMoEFactory": (
        "num_experts", "top_k", "hidden_size", "intermediate_size", "renormalize", "quant_config", "prefix",
        "router", "scoring_func", "shared_experts", "apply_router_weight_on_input",
        "is_fused_checkpoint_transposed", "routed_input_transform", "routed_output_transform",
        "enable_eplb", "num_redundant_experts",
    ),
    "vllm.model_executor.layers.fused_moe:MoERunner": (
        "moe_config", "shared_experts", "update_expert_map", "routed_experts",
    ),
    "vllm.model_executor.layers.fused_moe:GateLinear": ("bias", "out_dtype", "quant_config", "prefix"),
    "vllm.model_executor.layers.fused_moe.config:RoutingMethodType": ("Custom", "DeepSeekV3", "Renormalize"),
    "vllm.model_executor.layers.fused_moe.router.base_router:BaseRouter": (
        "top_k", "global_num_experts", "eplb_state", "_compute_routing", "_apply_eplb_mapping", "routing_method_type",
        "supports_monolithic_kernels@0.33",
    ),
    # what the CPU kernels run (model_executor/cpu_support.py)
    "vllm.model_executor.layers.fused_moe:RoutedExperts": ("quant_method",),
    "vllm.model_executor.layers.fused_moe.fused_moe_method_base:FusedMoEMethodBase": ("is_monolithic",),
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors:CompressedTensorsConfig": (
        "_add_fused_moe_to_target_scheme_map", "get_scheme_dict",
    ),
    "vllm.model_executor.layers.quantization.compressed_tensors.schemes:CompressedTensorsW8A8Int8": (
        "input_symmetric",
    ),
    "vllm.model_executor.layers.quantization.fp8:Fp8Config": (
        "ignored_layers", "packed_modules_mapping", "ignored_layers_match_mode", "weight_block_size",
    ),
    "vllm.model_executor.layers.quantization.utils.quant_utils:is_layer_skipped": (),
    "vllm.model_executor.layers.quantization.compressed_tensors.schemes:CompressedTensorsWNA16": (),
    "vllm.model_executor.layers.quantization.auto_awq:AutoAWQConfig": ("weight_bits", "modules_to_not_convert"),
    "vllm.model_executor.layers.quantization.auto_gptq:AutoGPTQConfig": ("weight_bits", "desc_act"),
    # our CPU expert classes and where they join vLLM's choice (layers/cpu_experts.py): the
    # quantized MoE methods call the oracle their module imported, by that name
    "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUExpertsInt8": (
        "apply", "is_supported_config", "_supports_current_device", "_supports_routing_method",
    ),
    "vllm.model_executor.layers.fused_moe.experts.cpu_moe:CPUExpertsInt4": ("_supports_current_device",),
    "vllm.model_executor.layers.fused_moe.activation:MoEActivation": ("SILU",),
    "vllm.model_executor.layers.fused_moe.config:FusedMoEConfig": ("in_dtype",),
    "vllm.model_executor.layers.fused_moe.config:FusedMoEParallelConfig": ("use_all2all_kernels",),
    "vllm.model_executor.layers.fused_moe.topk_weight_and_reduce:TopKWeightAndReduceNoOP": (),
    "vllm.model_executor.layers.fused_moe.oracle.int8:Int8MoeBackend": ("CPU",),
    "vllm.model_executor.layers.fused_moe.oracle.int_wna16:WNA16MoEBackend": ("CPU",),
    "vllm.model_executor.layers.fused_moe.oracle.int_wna16:_backend_incompatibility_reason": (),
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe:compressed_tensors_moe_w8a8_int8": (
        "select_int8_moe_backend",
    ),
    "vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe:compressed_tensors_moe_wna16": (
        "select_wna16_moe_backend",
    ),
    "vllm.model_executor.layers.quantization:auto_awq": ("select_wna16_moe_backend",),
    "vllm.model_executor.layers.quantization:auto_gptq": ("select_wna16_moe_backend",),
    "vllm.model_executor.layers.quantization:moe_wna16": ("select_wna16_moe_backend",),
    "vllm.model_executor.layers.quantization.utils.quant_utils:QuantKey": (),
    "vllm.model_executor.layers.quantization.utils.quant_utils:kInt8DynamicTokenSym": (),
    "vllm.model_executor.layers.quantization.utils.quant_utils:kInt8StaticChannelSym": (),
    # weights
    "vllm.model_executor.model_loader.weight_utils:sharded_weight_loader": (),
    "vllm.model_executor.utils:set_weight_attrs": (),
    "vllm.model_executor.models.utils:AutoWeightsLoader": ("load_weights",),
    "vllm.model_executor.models.utils:WeightsMapper": (
        "orig_to_new_prefix", "orig_to_new_substr", "orig_to_new_stacked", "apply",
    ),
    "vllm.model_executor.models.utils:maybe_prefix": (),
    # EPLB: the per-layer state our routers carry, vLLM's initial expert arrangement
    "vllm.distributed.eplb.eplb_state:EplbLayerState": ("set_layer_state",),
    "vllm.distributed.eplb.eplb_state:EplbState": ("build_initial_global_physical_to_logical_map",),
    # LoRA: vLLM's own matching of lora_target_modules, the modules it wraps and expects in
    # adapters (the CPU backend's routed experts left out: layers/experts.py)
    "vllm.lora.utils:is_in_target_modules": (),
    "vllm.lora.utils:get_supported_lora_modules": (),
    "vllm.lora.model_manager:LoRAModelManager": ("supported_lora_modules", "model"),
    # pipeline parallelism
    "vllm.model_executor.models.utils:PPMissingLayer": (),
    "vllm.model_executor.models.utils:make_layers": (),
    "vllm.model_executor.models.utils:extract_layer_index": (),
    "vllm.model_executor.models.utils:make_empty_intermediate_tensors_factory": (),
    "vllm.model_executor.models.utils:spec_decode_needs_target_embed": (),
    # model interfaces
    "vllm.model_executor.models.interfaces:SupportsQuant": (),
    "vllm.model_executor.models.interfaces:SupportsLoRA": ("packed_modules_mapping", "embedding_modules"),
    "vllm.model_executor.models.interfaces:MixtureOfExperts": (
        "moe_layers", "num_moe_layers", "num_logical_experts", "num_physical_experts", "num_local_physical_experts",
        "num_redundant_experts", "set_eplb_state", "update_physical_experts_metadata",
    ),
    "vllm.model_executor.models.interfaces:SupportsPP": ("make_empty_intermediate_tensors",),
    # speculative-decoding targets
    "vllm.model_executor.models.interfaces:SupportsEagle": (),
    "vllm.model_executor.models.interfaces:SupportsEagle3": (
        "set_aux_hidden_state_layers", "get_eagle3_default_aux_hidden_state_layers",
    ),
    "vllm.model_executor.models.interfaces:EagleModelMixin": (
        "start_layer", "supports_aux_hidden_states_over_pp", "_maybe_add_hidden_state",
        "pack_local_aux_hidden_states", "collect_remote_aux_hidden_states",
    ),
    # the Laguna DFlash drafter
    "vllm.model_executor.models.qwen3_dflash:DFlashQwen3ForCausalLM": (
        "combine_hidden_states", "precompute_and_store_context_kv", "get_draft_kv_cache_layer_names",
        "get_draft_attn_causal", "compute_logits", "embed_input_ids",
    ),
    "vllm.model_executor.models.qwen3_dflash:dflash_has_any_non_causal": (),
    "vllm.model_executor.models.utils:get_draft_quant_config": (),
    "vllm.model_executor.models.utils:process_eagle_weight": (),
    "vllm.model_executor.models.interfaces:HasInnerState": (),
    "vllm.model_executor.models.interfaces:IsHybrid": (
        "get_mamba_state_shape_from_config", "get_mamba_state_copy_func",
    ),
    # LFM2's conv state in vLLM's mamba cache
    "vllm.model_executor.layers.mamba.abstract:MambaBase": ("get_state_shape", "get_state_dtype", "mamba_type"),
    f"{_MAMBA_UTILS}:MambaStateShapeCalculator": ("short_conv_state_shape",),
    f"{_MAMBA_UTILS}:MambaStateDtypeCalculator": ("short_conv_state_dtype",),
    f"{_MAMBA_UTILS}:MambaStateCopyFuncCalculator": ("short_conv_state_copy_func",),
    f"{_MAMBA_UTILS}:is_conv_state_dim_first": (),
    "vllm.v1.attention.backends.registry:MambaAttentionBackendEnum": ("SHORT_CONV",),
    "vllm.v1.attention.backends.short_conv_attn:ShortConvAttentionMetadata": (
        "num_decodes", "num_decode_tokens", "num_prefills", "num_prefill_tokens", "state_indices_tensor_d",
        "state_indices_tensor_p", "query_start_loc_p", "has_initial_states_p",
    ),
    # its decode step on vLLM's x86 CPU build: vLLM's C++ kernel, as in-tree's LFM2 calls it
    "vllm._custom_ops:causal_conv1d_update_cpu_vec": ("conv_state_indices", "pad_slot_id"),
    "vllm.platforms:CpuArchEnum": ("X86",),
    "vllm.v1.attention.backends.utils:PAD_SLOT_ID": (),
    # parsers
    "vllm.reasoning.abs_reasoning_parsers:ReasoningParser": (
        "vocab", "model_tokenizer", "reasoning_start_str", "reasoning_end_str", "is_reasoning_end",
        "is_reasoning_end_streaming", "extract_content_ids", "count_reasoning_tokens",
        "adjust_initial_state_from_prompt", "adjust_request", "extract_reasoning", "extract_reasoning_streaming",
    ),
    "vllm.tool_parsers.abstract_tool_parser:ToolParser": (
        "vocab", "tools", "supports_required_and_named", "default_tool_strict_level", "adjust_request",
        "extract_tool_calls", "extract_tool_calls_streaming",
    ),
    "vllm.tool_parsers.abstract_tool_parser:Tool": (),
    "vllm.tokenizers:TokenizerLike": (),
    "vllm.renderers.chat_utils:make_tool_call_id": (),
    "vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest": (
        "skip_special_tokens", "tools", "tool_choice", "chat_template_kwargs", "reasoning_effort",
    ),
    "vllm.entrypoints.openai.responses.protocol:ResponsesRequest": (),
    f"{_PROTOCOL}:DeltaMessage": ("reasoning", "content", "tool_calls"),
    f"{_PROTOCOL}:DeltaToolCall": ("index", "id", "type", "function"),
    f"{_PROTOCOL}:DeltaFunctionCall": ("name", "arguments"),
    f"{_PROTOCOL}:ExtractedToolCallInformation": ("tools_called", "tool_calls", "content"),
    f"{_PROTOCOL}:FunctionCall": ("name", "arguments"),
    f"{_PROTOCOL}:ToolCall": ("function",),
}

#: (module, attribute name) where vLLM reads a hook of ours by name
HOOKS: tuple[tuple[str, str], ...] = (
    # the delegating parser tells our tool parser that no reasoning parser runs
    ("vllm.parser.abstract_parser", "skip_reasoning_parsing"),
    # the engine core's structured-output gate asks our reasoning parser where reasoning ends
    ("vllm.v1.structured_output", "is_reasoning_end"),
    ("vllm.v1.structured_output", "is_reasoning_end_streaming"),
    # LFM2's conv-state dtype before the model exists (IsHybrid does not declare it)
    ("vllm.platforms.interface", "get_mamba_state_dtype_from_config"),
    # vLLM's WNA16 kernel factory accepts vLLM's CPU int4 class only, by identity (so the int4
    # fallback picks that class itself)
    ("vllm.model_executor.layers.fused_moe.oracle.int_wna16", "assert experts_cls in allowed_experts"),
    # our routers refuse monolithic MoE kernels
    ("vllm.model_executor.layers.fused_moe.layer", "supports_monolithic_kernels@0.33"),
    # the start-up checks, looked up in MODELS_CONFIG_MAP while the engine config is built
    ("vllm.config.vllm", "MODELS_CONFIG_MAP"),
    ("vllm.config.vllm", "verify_and_update_config"),
    ("vllm.config.model", "verify_and_update_model_config"),
    # the KV-cache size the CPU platform reads (the start-up check reads it before the platform does)
    ("vllm.platforms.cpu", "VLLM_CPU_KVCACHE_SPACE"),
    # the MoE factory picks its LoRA experts from the current config's lora_config, which
    # layers/experts.py hides for layers LoRA will not wrap
    ("vllm.model_executor.layers.fused_moe.layer", "is_lora_enabled=vllm_config.lora_config is not None"),
    # LoRA reads the model's module-name declarations; EPLB its expert counts and weights
    ("vllm.lora.utils", "packed_modules_mapping"),
    ("vllm.lora.worker_manager", "hf_to_vllm_mapper"),
    # the LoRA manager registers itself on the model (our setter drops the CPU backend's routed
    # experts from what adapters may carry); the worker expects an adapter's modules from it
    ("vllm.lora.model_manager", "self.model.lora_manager = self"),
    ("vllm.lora.worker_manager", "self._adapter_manager.supported_lora_modules"),
    ("vllm.distributed.eplb.eplb_state", "num_redundant_experts"),
    # speculative decoding: the runner asks the target for aux hidden states, the DFlash
    # proposer drives the drafter, and the V1 proposer accepts drafters of vLLM's DFlash class
    ("vllm.v1.worker.gpu_model_runner", "set_aux_hidden_state_layers"),
    ("vllm.v1.worker.gpu_model_runner", "make_empty_intermediate_tensors"),
    ("vllm.v1.spec_decode.dflash", "precompute_and_store_context_kv"),
    ("vllm.v1.spec_decode.llm_base_proposer", "combine_hidden_states"),
    ("vllm.v1.spec_decode.llm_base_proposer", "DFlashQwen3ForCausalLM"),
)


def _split(pinned: str) -> tuple[str, tuple[int, ...]]:
    name, _, since = pinned.partition("@")
    return name, tuple(int(p) for p in since.split(".")) if since else ()


def _tree_version(tree: SourceTree) -> tuple[int, ...]:
    text = (tree.root / "_version.py").read_text()
    match = re.search(r"__version__ = version = '(\d+)\.(\d+)", text)
    assert match, f"no __version__ in {tree.root / '_version.py'}"
    return tuple(int(g) for g in match.groups())


def _package_imports() -> set[str]:
    found = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
                found.update(f"{node.module}:{alias.name}" for alias in node.names)
    return found


def test_every_vllm_import_of_the_package_is_pinned():
    unpinned = sorted(_package_imports() - PINS.keys())
    assert not unpinned, "vllm_laguna imports vLLM symbols not pinned in PINS: " + ", ".join(unpinned)


@pytest.mark.parametrize("symbol", sorted(PINS))
def test_pinned_symbol_imports_from_the_installed_vllm(symbol):
    module, name = symbol.split(":")
    parent = importlib.import_module(module)
    if not hasattr(parent, name):  # a submodule (``from package import module``)
        importlib.import_module(f"{module}.{name}")
    assert getattr(parent, name) is not None


def _trees() -> list[str]:
    import vllm

    extra = [p for p in os.environ.get("VLLM_SOURCE_TREES", "").split(os.pathsep) if p]
    return [str(Path(vllm.__file__).parent), *extra]


@pytest.mark.parametrize("root", _trees())
def test_pins_resolve_in_the_source_tree(root):
    """Each symbol resolves and has each pinned member, in the installed tree and in every
    tree of ``VLLM_SOURCE_TREES``; each hook name is still read where vLLM reads it."""
    tree = SourceTree(root)
    version = _tree_version(tree)
    problems = []
    for symbol, members in PINS.items():
        module, name = symbol.split(":")
        definition = tree.resolve(module, name)
        if definition is None:
            problems.append(f"{symbol}: not found")
            continue
        for pinned in members:
            member, since = _split(pinned)
            if version >= since and not tree.has_member(definition, member):
                problems.append(f"{symbol}: no member {member!r}")
    for module, pinned in HOOKS:
        hook, since = _split(pinned)
        path = tree.module_path(module)
        if version >= since and (path is None or hook not in path.read_text()):
            problems.append(f"{module}: no longer reads {hook!r}")
    assert not problems, f"vLLM {'.'.join(map(str, version))} at {root}:\n  " + "\n  ".join(problems)


def test_the_source_checker_sees_what_is_missing():
    """The static checker is not vacuous: a made-up symbol, member and keyword are reported."""
    import vllm

    tree = SourceTree(Path(vllm.__file__).parent)
    assert tree.resolve("vllm.model_executor.layers.fused_moe", "NoSuchFactory") is None
    router = tree.resolve("vllm.model_executor.layers.fused_moe.router.base_router", "BaseRouter")
    assert tree.has_member(router, "top_k") and not tree.has_member(router, "no_such_member")
    attention = tree.resolve("vllm.model_executor.layers.attention", "Attention")
    assert tree.has_member(attention, "per_layer_sliding_window")
    assert not tree.has_member(attention, "sinks")  # a **kwargs pass-through: pinned on the backends


def test_our_routers_refuse_monolithic_kernels():
    """vLLM 0.33 sets ``require_decomposed_backend`` from ``not router.supports_monolithic_kernels``
    (pinned in HOOKS), which keeps every monolithic expert kernel, routing on its own, away."""
    import torch
    from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
    from vllm.platforms import current_platform

    from vllm_laguna.model_executor.layers.routing import LagunaTopKRouter, Llama4TopKRouter

    routers = [
        LagunaTopKRouter(top_k=2, num_experts=8, correction_bias=torch.zeros(8), softcap=0.0, routed_scaling_factor=1.0),
        Llama4TopKRouter(top_k=2, global_num_experts=8),
    ]
    for router in routers:
        assert router.supports_monolithic_kernels is False
    # Custom, except Laguna's on CPU: for unquantized or FP8 experts (no quant config here)
    # DeepSeekV3, which vLLM's CPU FP8 MoE kernels accept (LagunaTopKRouter.routing_method_type)
    laguna_on_this_platform = RoutingMethodType.DeepSeekV3 if current_platform.is_cpu() else RoutingMethodType.Custom
    assert routers[0].routing_method_type == laguna_on_this_platform
    assert routers[1].routing_method_type == RoutingMethodType.Custom
