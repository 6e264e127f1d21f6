"""How an attention layer's heads split over tensor-parallel ranks (checked once, with a clear error)."""

from dataclasses import dataclass

import torch

from vllm.distributed import get_tensor_model_parallel_world_size


@dataclass(frozen=True)
class RankHeads:
    """Query and KV heads of one attention layer on this rank.

    Query heads are split evenly; KV heads are split when there are at least as many as
    ranks and replicated otherwise (vLLM's ``QKVParallelLinear`` rule), so one of
    ``num_kv_heads`` and ``tensor_parallel_size`` must divide the other.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def for_this_rank(
        cls, total_heads: int, total_kv_heads: int, head_dim: int, heads_field: str = "num_attention_heads"
    ) -> "RankHeads":
        tp_size = get_tensor_model_parallel_world_size()
        if total_heads % tp_size:
            raise ValueError(f"{heads_field}={total_heads} is not divisible by tensor_parallel_size={tp_size}")
        if total_kv_heads % tp_size and tp_size % total_kv_heads:
            raise ValueError(
                f"num_key_value_heads={total_kv_heads} and tensor_parallel_size={tp_size}: "
                "one must divide the other"
            )
        return cls(total_heads // tp_size, max(1, total_kv_heads // tp_size), head_dim)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``[T, (H + 2 KV) * D]`` from ``QKVParallelLinear`` -> q ``[T, H*D]``, k and v ``[T, KV*D]``."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
