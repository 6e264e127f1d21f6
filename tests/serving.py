"""``vllm serve`` as a real process on loopback, for the end-to-end tests: the package's
``LocalServer`` (the demo uses it too) with the tests' environment."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from vllm_laguna.local_server import LocalServer


@contextlib.contextmanager
def vllm_serve(checkpoint: Path, log: Path, *flags: str, timeout: float = 900) -> Iterator[str]:
    """Serve ``checkpoint`` with ``flags`` (the ``vllm`` command of this interpreter's
    environment, the user's multiprocessing default, 1 GiB of KV cache); yields the
    OpenAI base URL and stops the server and its engine-core child on exit."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO")
    with LocalServer(checkpoint, flags, log=log, env=env) as server:
        server.wait_healthy(timeout)
        yield server.url
