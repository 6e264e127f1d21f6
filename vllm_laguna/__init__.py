"""vLLM plugin: Laguna, LFM2 and Llama 4 text models, and the Laguna parsers.

vLLM calls :func:`register` (entry point ``vllm.general_plugins: laguna``) in every process
it starts, possibly several times. It only records lazy ``"module:Class"`` strings and the
start-up checks (:mod:`vllm_laguna.startup_checks`), so it imports none of our model, kernel
or parser code and initialises no device.
"""

__version__ = "0.1.0"

_MODELS_PKG = "vllm_laguna.model_executor.models"

#: architecture name -> "module:Class"; these replace vLLM's in-tree classes.
MODELS = {
    "LagunaForCausalLM": f"{_MODELS_PKG}.laguna:LagunaForCausalLM",
    "DFlashLagunaForCausalLM": f"{_MODELS_PKG}.laguna_dflash:LagunaDFlashForCausalLM",
    "Lfm2ForCausalLM": f"{_MODELS_PKG}.lfm2:Lfm2ForCausalLM",
    "Llama4ForCausalLM": f"{_MODELS_PKG}.llama4:Llama4ForCausalLM",
}

#: parser name -> (module, class) for vLLM's reasoning / tool parser managers.
REASONING_PARSERS = {
    "laguna": ("vllm_laguna.reasoning.laguna_reasoning_parser", "LagunaReasoningParser"),
}
TOOL_PARSERS = {
    "laguna": ("vllm_laguna.tool_parsers.laguna_tool_parser", "LagunaToolParser"),
}

_registered = False


def register() -> None:
    """Register our models over vLLM's in-tree ones, and our parsers. Idempotent."""
    global _registered
    if _registered:
        return
    from vllm import ModelRegistry

    for arch, target in MODELS.items():
        ModelRegistry.register_model(arch, target)

    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    for name, (module, cls) in REASONING_PARSERS.items():
        ReasoningParserManager.register_lazy_module(name, module, cls)
    for name, (module, cls) in TOOL_PARSERS.items():
        ToolParserManager.register_lazy_module(name, module, cls)

    from vllm_laguna import startup_checks

    startup_checks.install(list(MODELS))
    if not startup_checks.multimodal_llama4_importable():
        # vLLM's multimodal Llama 4 cannot even be inspected here; our text class lets vLLM
        # resolve the architecture, and the start-up check then says which override to use.
        ModelRegistry.register_model(startup_checks.MULTIMODAL_LLAMA4, MODELS["Llama4ForCausalLM"])
    _registered = True
