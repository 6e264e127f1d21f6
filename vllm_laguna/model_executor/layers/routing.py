"""MoE routers for vLLM's fused-MoE layer (``FusedMoEFactory(router=...)``).

vLLM 0.32's CPU router only knows softmax top-k (``assert scoring_func == "softmax"``), so
Laguna's sigmoid + correction-bias routing and Llama 4's sigmoid-of-top-k crash there.
These routers implement the two schemes themselves and are handed to the fused-MoE layer
on every platform; the math lives in :mod:`vllm_laguna.kernels` (Triton on CUDA, torch
elsewhere).
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from vllm_laguna import kernels


class SigmoidTopKRouter(BaseRouter):
    """Laguna routing: softcap -> sigmoid -> top-k by (score + bias) -> renormalise -> scale.

    ``correction_bias`` is the layer's ``e_score_correction_bias`` parameter (fp32, [E]);
    it steers selection only. The routed scaling factor is folded into the weights.
    """

    def __init__(
        self,
        top_k: int,
        num_experts: int,
        correction_bias: torch.Tensor | None,
        softcap: float,
        routed_scaling_factor: float,
    ):
        super().__init__(top_k=top_k, global_num_experts=num_experts)
        self.correction_bias = correction_bias
        self.softcap = softcap
        self.routed_scaling_factor = routed_scaling_factor

    @property
    def routing_method_type(self) -> RoutingMethodType:
        # Custom: no fused-MoE backend may substitute its own routing for ours.
        return RoutingMethodType.Custom

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return kernels.sigmoid_topk(
            router_logits,
            self.correction_bias,
            self.top_k,
            softcap=self.softcap,
            routed_scaling_factor=self.routed_scaling_factor,
        )


class Llama4TopKRouter(BaseRouter):
    """Llama 4 routing: top-k of the raw logits, sigmoid of the chosen logits.

    The weights are meant for the expert *input* (``apply_router_weight_on_input``).
    """

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return kernels.llama4_topk(router_logits, self.top_k)
