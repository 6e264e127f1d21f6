"""Custom ops: each has a plain-torch reference beside its fused Triton kernel.

The functions exported here dispatch (see :mod:`vllm_laguna.kernels.dispatch`): the fused
kernel on CUDA, the torch reference elsewhere, and everywhere when
``VLLM_LAGUNA_TORCH_KERNELS=1``. Importing this package never imports triton nor
initialises CUDA; the kernel modules load on the first fused call.
"""

from vllm_laguna.kernels.gated_output import softplus_gate
from vllm_laguna.kernels.sigmoid_topk import llama4_topk, sigmoid_topk

__all__ = ["llama4_topk", "sigmoid_topk", "softplus_gate"]
