"""Elementary fp32 functions for the Triton kernels, rounded as torch rounds them on CUDA.

On a GPU these call CUDA's libdevice (``__nv_expf``, ``__nv_tanhf``, ``__nv_log1pf``) and
IEEE division, the very functions torch's CUDA kernels for ``sigmoid``, ``tanh``,
``softplus`` and ``/`` compile to (PyTorch builds without fast math), so a kernel built from
them reproduces the torch reference's fp32 values bit for bit on the same GPU. That is what
keeps routing ids identical even when a soft-cap saturates scores into ulp-level near-ties.
Where torch rounds between two kernels and a fused kernel would not (a product that LLVM
could contract into a later add), ``mul_rn`` keeps torch's rounding.

The Triton interpreter has no libdevice, so under ``TRITON_INTERPRET=1`` the same functions
are built from ``tl.exp``/``tl.log`` (numpy underneath): accurate to a few ulp, not bit-equal
to torch's CPU math (which is not equal to torch's CUDA math either).
"""

from __future__ import annotations

import triton
import triton.language as tl

from vllm_laguna.kernels.dispatch import TRITON_INTERPRET

if TRITON_INTERPRET:
    # Interpreter only (CPU tests): stand-ins for libdevice, never compiled for a GPU.

    @triton.jit
    def mul_rn(x, y):
        return x * y

    @triton.jit
    def exp(x):
        return tl.exp(x)

    @triton.jit
    def log1p(x):
        """Goldberg's exact-cancellation form: ``log(u) * x / (u - 1)`` with ``u = 1 + x``."""
        u = 1.0 + x
        return tl.where(u == 1.0, x, tl.log(u) * tl.math.div_rn(x, u - 1.0))

    @triton.jit
    def tanh(x):
        """Odd Taylor series to x^9 below |x| = 0.25 (next term < 1e-8 relative), else
        ``(1 - e) / (1 + e)`` with ``e = exp(-2|x|) <= 0.61`` (no cancellation)."""
        ax = tl.abs(x)
        e = tl.exp(-2.0 * ax)
        large = tl.math.div_rn(1.0 - e, 1.0 + e)
        x2 = x * x
        series = x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0))
        series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + series)))
        return tl.where(ax < 0.25, series, tl.where(x < 0.0, -large, large))

else:
    # GPU: libdevice, as torch's CUDA kernels.
    from triton.language.extra import libdevice

    @triton.jit
    def mul_rn(x, y):
        """A product rounded on its own: never contracted into an FMA with a later add."""
        return libdevice.mul_rn(x, y)

    @triton.jit
    def exp(x):
        return libdevice.exp(x)

    @triton.jit
    def log1p(x):
        return libdevice.log1p(x)

    @triton.jit
    def tanh(x):
        return libdevice.tanh(x)


@triton.jit
def sigmoid(x):
    """torch's CUDA sigmoid: ``1 / (1 + exp(-x))`` with IEEE division."""
    return tl.math.div_rn(1.0, 1.0 + exp(-x))


@triton.jit
def softplus(x):
    """torch's softplus (beta 1, threshold 20): ``x`` above 20, else ``log1p(exp(x))``."""
    return tl.where(x > 20.0, x, log1p(exp(x)))
