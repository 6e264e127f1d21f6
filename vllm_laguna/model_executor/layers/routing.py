"""MoE routers for vLLM's fused-MoE layer (``FusedMoEFactory(router=...)``).

vLLM 0.32's CPU router only knows softmax top-k (``assert scoring_func == "softmax"``), so
Laguna's sigmoid + correction-bias routing and Llama 4's sigmoid-of-top-k crash there.
These routers implement the two schemes themselves and are handed to the fused-MoE layer
on every platform; the math lives in :mod:`vllm_laguna.kernels` (Triton on CUDA, torch
elsewhere). Both declare that no fused-MoE backend may route in their place
(:class:`OwnRouting`).
"""

from __future__ import annotations

import torch

from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter

from vllm_laguna import kernels


class OwnRouting(BaseRouter):
    """A router whose routing no fused-MoE backend may replace.

    * ``routing_method_type`` is ``Custom``: backends that route by the method's name
      have no name for ours.
    * ``supports_monolithic_kernels`` is False: vLLM 0.33 then sets the MoE config's
      ``require_decomposed_backend``, which excludes every monolithic expert kernel (those
      that take router logits and route inside the kernel, e.g. TRT-LLM's, or zentorch's
      int4 MoE, which accepts ``Custom``). vLLM 0.32 has no such hook and never reads it.
    """

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    @property
    def supports_monolithic_kernels(self) -> bool:
        return False


class SigmoidTopKRouter(OwnRouting):
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

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        return kernels.sigmoid_topk(
            router_logits,
            self.correction_bias,
            self.top_k,
            softcap=self.softcap,
            routed_scaling_factor=self.routed_scaling_factor,
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

    def __init__(self, top_k: int, global_num_experts: int):
        super().__init__(top_k=1, global_num_experts=global_num_experts)
        self.choices_per_token = top_k

    def _compute_routing(self, hidden_states, router_logits, indices_type, *, input_ids=None):
        weights, ids = kernels.llama4_topk(router_logits, self.choices_per_token)
        return weights.reshape(-1, 1), ids.reshape(-1, 1)
