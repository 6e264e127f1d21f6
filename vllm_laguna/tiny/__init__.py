"""Tiny checkpoints with random weights, for tests, benchmarks and the demo.

``python -m vllm_laguna.tiny laguna OUT_DIR [--preset xs2-scaled] [--layout transformers] ...``
"""

from vllm_laguna.tiny.laguna import LagunaTiny, build_laguna

__all__ = ["LagunaTiny", "build_laguna"]
