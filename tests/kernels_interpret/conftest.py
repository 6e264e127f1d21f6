"""Kernel tests that run Triton kernels on CPU tensors through the Triton interpreter.

They need ``TRITON_INTERPRET=1`` set before triton is imported, so they run in a process
of their own, one per kernel, spawned by ``tests/test_kernels_interpreter.py``; a plain
``pytest tests`` does not collect them.
"""

import os

if os.environ.get("TRITON_INTERPRET") != "1":
    collect_ignore_glob = ["*.py"]
