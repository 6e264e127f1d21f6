"""Custom ops: each has a plain-torch reference beside its fused kernel.

Dispatch lives in the op functions exported here: fused kernels on CUDA, the torch
reference elsewhere (and everywhere when ``VLLM_LAGUNA_TORCH_KERNELS=1``).
"""

from vllm_laguna.kernels.gated_output import softplus_gate_reference
from vllm_laguna.kernels.sigmoid_topk import llama4_topk_reference, sigmoid_topk_reference

sigmoid_topk = sigmoid_topk_reference
llama4_topk = llama4_topk_reference
softplus_gate = softplus_gate_reference

__all__ = ["llama4_topk", "sigmoid_topk", "softplus_gate"]
