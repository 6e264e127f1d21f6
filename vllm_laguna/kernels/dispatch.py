"""Which implementation of a custom op runs, and how torch.compile sees the fused ones.

Rule: the fused Triton kernel runs when its input lives on a CUDA device (or anywhere
under ``TRITON_INTERPRET=1``, which is how the CPU tests run the kernels) and triton is
installed; everywhere else the plain-torch reference runs, so the CPU path is the torch
math bit for bit. ``VLLM_LAGUNA_TORCH_KERNELS=1`` forces the reference everywhere. The
switches are read once, at import, so Dynamo sees constants and installs no guards.

Fused kernels are exposed as ``torch.ops.vllm_laguna.*`` library ops with fake (meta)
implementations, not as vLLM ``CustomOp`` layers. In vLLM 0.32 the default
``VLLM_COMPILE`` mode with the Inductor backend appends ``"none"`` to
``compilation_config.custom_ops`` (``VllmConfig.__post_init__``), which switches every
``CustomOp`` subclass to its ``forward_native`` torch code; a ``CustomOp`` would thus
silently drop our kernels in the default mode. ``custom_ops`` does not touch library ops:
Dynamo records one opaque node per call (shapes from the fake impl) instead of tracing into
the Triton launcher, Inductor calls the real impl at run time, and vLLM's CUDA graphs
capture its launch like any other kernel in the piecewise graph. Eager callers (vLLM's
fused-MoE layer runs its router inside the opaque ``vllm.moe_forward`` op on CUDA) call the
launcher directly and skip the dispatcher hop.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

NAMESPACE = "vllm_laguna"
LIBRARY = torch.library.Library(NAMESPACE, "FRAGMENT")

FORCE_TORCH = os.environ.get("VLLM_LAGUNA_TORCH_KERNELS", "0").strip() == "1"
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip() == "1"
HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether a fused kernel may run on ``tensor``'s device in this process."""
    return HAS_TRITON and not FORCE_TORCH and (tensor.is_cuda or TRITON_INTERPRET)


def register_op(name: str, schema: str, impl: Callable, fake: Callable) -> Callable:
    """Defines ``torch.ops.vllm_laguna.<name>`` with a CUDA impl and a fake impl.

    The CPU impl is the same Triton launcher; it only works under ``TRITON_INTERPRET=1``
    and exists so the interpreter tests run the op itself (schema, fake impl, compile).
    """
    LIBRARY.define(name + schema)
    for dispatch_key in ("CUDA", "CPU"):
        LIBRARY.impl(name, impl, dispatch_key)
    torch.library.register_fake(f"{NAMESPACE}::{name}", fake, lib=LIBRARY)
    return getattr(torch.ops.vllm_laguna, name)


def run_fused(op: Callable, launch: Callable, *args):
    """Calls the registered op while Dynamo traces (an opaque node), the launcher otherwise."""
    if torch.compiler.is_compiling():
        return op(*args)
    return launch(*args)
