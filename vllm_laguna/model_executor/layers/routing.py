"""MoE routers for vLLM's fused-MoE layer (``FusedMoEFactory(router=...)``).

vLLM 0.32's CPU router only knows softmax top-k (``assert scoring_func == "softmax"``), so
Laguna's sigmoid (or sqrt-softplus) + correction-bias routing and Llama 4's sigmoid-of-top-k
crash there.
These routers implement the two schemes themselves and are handed to the fused-MoE layer
on every platform; the math lives in :mod:`vllm_laguna.kernels` (Triton on CUDA, torch
elsewhere). Both declare that no fused-MoE backend may route in their place
(:class:`OwnRouting`). ``_compute_routing`` returns logical expert ids; with EPLB,
``BaseRouter`` then maps them to physical replicas through ``eplb_state`` and records the load
(see :mod:`vllm_laguna.model_executor.layers.experts`).
"""

from __future__ import annotations

import torch

from vllm.distributed.eplb.eplb_state import EplbLayerState
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.platforms import current_platform

from vllm_laguna import kernels


class OwnRouting(BaseRouter):
    """A router whose routing no fused-MoE backend may replace.

    * ``routing_method_type`` is ``Custom``: backends that route by the method's name
      have no name for ours.
    * ``supports_monolithic_kernels`` is False: vLLM 0.33 then sets the MoE config's
      ``require_decomposed_backend``, which excludes every monolithic expert kernel (those
      that take router logits and route inside the kernel, e.g. TRT-LLM's, or zentorch's
      int4 MoE, which accepts ``Custom``). vLLM 0.32 has no such hook and never reads it;
      there ``cpu_support.check_built_experts`` refuses a monolithic kernel at load.
    """

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    @property
    def supports_monolithic_kernels(self) -> bool:
        return False


class LagunaTopKRouter(OwnRouting):
    """Laguna routing: softcap -> score -> top-k by (score + bias) -> renormalise -> scale.

    The score is ``sigmoid`` or ``sqrt(softplus)`` (``score_func``, config
    ``moe_router_score_func``). ``correction_bias`` is the layer's ``e_score_correction_bias``
    parameter (fp32, [E]); it steers selection only. The routed scaling factor is folded into
    the weights. ``cpu_routing_method`` is the label reported on the CPU backend
    (``cpu_support.cpu_routing_method`` of the experts' quantization).
    """

    def __init__(
        self,
        top_k: int,
        num_experts: int,
        correction_bias: torch.Tensor | None,
        softcap: float,
        routed_scaling_factor: float,
        score_func: str = "sigmoid",
        eplb_state: EplbLayerState | None = None,
        cpu_routing_method: RoutingMethodType = RoutingMethodType.DeepSeekV3,
    ):
        super().__init__(top_k=top_k, global_num_experts=num_experts, eplb_state=eplb_state)
        self.correction_bias = correction_bias
        self.softcap = softcap
        self.routed_scaling_factor = routed_scaling_factor
        self.score_func = score_func
        self.cpu_routing_method = cpu_routing_method

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # On CPU every x86 expert class vLLM may pick for our layers is modular (takes this
        # router's ids and weights; a monolithic one is refused at load,
        # cpu_support.check_built_experts), and the label only selects the class, each of
        # which lists the labels it takes: DeepSeekV3 (what Laguna's routing is, with one
        # expert group) for the FP8 class, Renormalize for the int8 and int4 ones.
        # Elsewhere Custom (see OwnRouting).
        return self.cpu_routing_method if current_platform.is_cpu() else RoutingMethodType.Custom

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return kernels.sigmoid_topk(
            router_logits,
            self.correction_bias,
            self.top_k,
            softcap=self.softcap,
            routed_scaling_factor=self.routed_scaling_factor,
            score_func=self.score_func,
        )


class Llama4TopKRouter(OwnRouting):
    """Llama 4 routing: top-k of the raw logits, sigmoid of the chosen logits.

    The weights scale the expert *input* (the layer is built with
    ``apply_router_weight_on_input=True``): expert ``e`` sees ``x * sigmoid(logit_e)``.
    vLLM applies input weights for one expert per row only (its prepare step asserts
    ``topk == 1``), so the layer always routes one expert per row, and for
    ``top_k > 1`` each row is one (token, choice) pair: the runner's input transform repeats
    every token ``top_k`` times (row ``t * top_k + j``) and this router returns the routing of
    those rows, ``[T * top_k, 1]``, from the tokens' logits ``[T, E]``. With ``top_k == 1``
    rows are tokens and this is plain top-1 routing.
    """

    def __init__(self, top_k: int, global_num_experts: int, eplb_state: EplbLayerState | None = None):
        super().__init__(top_k=1, global_num_experts=global_num_experts, eplb_state=eplb_state)
        self.choices_per_token = top_k

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = kernels.llama4_topk(router_logits, self.choices_per_token)
        return weights.reshape(-1, 1), ids.reshape(-1, 1)

    def _apply_eplb_mapping(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """EPLB maps and counts ids as ``[tokens, k]`` (it records only the first
        ``num_unpadded_tokens * k`` entries and picks replicas per token); the rows here are
        (token, choice) pairs, so map them in that shape."""
        mapped = super()._apply_eplb_mapping(topk_ids.reshape(-1, self.choices_per_token))
        return mapped.reshape(-1, 1)
