"""Llama 4 MoE feed-forward on vLLM's fused-MoE layer.

transformers (``Llama4TextMoe``): ``logits = router(x)``; for each of the top-k experts
``e`` of a token, ``expert_e(x * sigmoid(logit_e))`` (the weight scales the expert's
*input*; no renormalisation), summed, plus ``shared_expert(x)``. Experts and the shared
expert are SwiGLU of width ``intermediate_size``.

vLLM's fused-MoE layer scales the input by the router weight when built with
``apply_router_weight_on_input=True`` (its prepare step multiplies the rows, the CPU and
Triton experts then skip the output weighting), but only for one expert per row: the
prepare step asserts ``topk == 1``. Since a SwiGLU expert is not linear in its input
scale, top-k cannot be folded into one scaled input per token; instead, for ``top_k > 1``,
the layer runs on one row per (token, choice): :class:`RepeatPerChoice` is the runner's routed-input
transform, :class:`~vllm_laguna.model_executor.layers.routing.Llama4TopKRouter` routes
each row to its one expert with its weight, and :class:`SumPerToken` (the routed-output
transform) adds a token's rows back up before the shared expert's output joins them. The
expert work is the same as top-k routing (one GEMM row per token and chosen expert); the
shared expert still sees each token once, and the tensor-parallel all-reduce happens once,
on the sum. With ``top_k == 1`` (Scout, Maverick) neither transform is installed and the
layer is vLLM's plain top-1 path.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import get_current_vllm_config
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.quantization import QuantizationConfig

from vllm_laguna.configs.llama4 import Llama4Arch
from vllm_laguna.model_executor.layers.experts import ExpertPlacement, fused_experts
from vllm_laguna.model_executor.layers.routing import Llama4TopKRouter
from vllm_laguna.model_executor.layers.swiglu import SwiGLU


class RepeatPerChoice(nn.Module):
    """``[T, H] -> [T * k, H]``: row ``t * k + j`` is token ``t`` for its ``j``-th expert."""

    def __init__(self, choices_per_token: int):
        super().__init__()
        self.choices_per_token = choices_per_token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.repeat_interleave(self.choices_per_token, dim=0)


class SumPerToken(nn.Module):
    """``[T * k, H] -> [T, H]``: adds up each token's ``k`` expert outputs."""

    #: a sum commutes with the tensor-parallel all-reduce (also a sum), so vLLM's runner
    #: may reduce once, after adding the shared expert, rather than before this transform
    reduce_commutative = True

    def __init__(self, choices_per_token: int):
        super().__init__()
        self.choices_per_token = choices_per_token

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(-1, self.choices_per_token, y.shape[-1]).sum(dim=1)


class Llama4MoE(nn.Module):
    """Router (``router``, kept unquantized), fused experts, shared expert.

    Checkpoint tensors: ``router.weight`` [E, H]; ``experts.gate_up_proj`` [E, H, 2I]
    and ``experts.down_proj`` [E, I, H], stored for ``x @ W`` and so transposed relative
    to vLLM's ``w13`` [E, 2I, H] / ``w2`` [E, H, I] (``is_fused_checkpoint_transposed``),
    or per-expert ``experts.{e}.{gate,up,down}_proj.*`` (quantized checkpoints);
    ``shared_expert.{gate,up,down}_proj``.
    """

    def __init__(self, arch: Llama4Arch, quant_config: QuantizationConfig | None, prefix: str):
        super().__init__()
        if get_tensor_model_parallel_world_size() > arch.num_experts:
            raise ValueError(
                f"tensor_parallel_size={get_tensor_model_parallel_world_size()} exceeds "
                f"num_local_experts={arch.num_experts}"
            )
        self.router = ReplicatedLinear(
            arch.hidden_size, arch.num_experts, bias=False, quant_config=None, prefix=f"{prefix}.router"
        )
        self.shared_expert = SwiGLU(
            arch.hidden_size,
            arch.intermediate_size,
            quant_config,
            reduce_results=False,
            prefix=f"{prefix}.shared_expert",
        )
        per_choice = arch.top_k > 1
        placement = ExpertPlacement.of(get_current_vllm_config(), arch.num_experts)
        self.experts = fused_experts(
            placement,
            prefix=f"{prefix}.experts",
            top_k=1,  # one expert per row; see the module docstring
            hidden_size=arch.hidden_size,
            intermediate_size=arch.intermediate_size,
            renormalize=False,
            quant_config=quant_config,
            router=Llama4TopKRouter(
                top_k=arch.top_k, global_num_experts=arch.num_experts, eplb_state=placement.router_eplb_state()
            ),
            scoring_func="sigmoid",
            apply_router_weight_on_input=True,
            is_fused_checkpoint_transposed=True,
            shared_experts=self.shared_expert,
            routed_input_transform=RepeatPerChoice(arch.top_k) if per_choice else None,
            routed_output_transform=SumPerToken(arch.top_k) if per_choice else None,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits, _ = self.router(x)
        return self.experts(hidden_states=x, router_logits=router_logits)
