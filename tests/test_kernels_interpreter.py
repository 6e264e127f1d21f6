"""Runs each Triton kernel's CPU test file under ``TRITON_INTERPRET=1`` in a process of its own.

The interpreter must be switched on before triton is imported, which this process may
already have done; hence one subprocess per kernel (see ``tests/kernels_interpret``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

INTERPRET_DIR = Path(__file__).parent / "kernels_interpret"


@pytest.mark.parametrize("test_file", ["test_sigmoid_topk.py", "test_softplus_gate.py", "test_causal_conv1d.py"])
def test_kernel_under_triton_interpreter(test_file):
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    env.pop("VLLM_LAGUNA_TORCH_KERNELS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(INTERPRET_DIR / test_file), "-q", "-n", "0", "-p", "no:cacheprovider"],
        cwd=INTERPRET_DIR.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
