"""``vllm serve`` as a real process, for the end-to-end tests: the package's ``LocalServer``
(the demo uses it too) with the tests' environment, on a Unix socket of its own, so no TCP
port is chosen here and then taken by another process before the server binds it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from vllm_laguna.local_server import LocalServer

if TYPE_CHECKING:
    from openai import OpenAI


@contextlib.contextmanager
def vllm_serve(checkpoint: Path, log: Path, *flags: str, timeout: float = 900) -> Iterator[OpenAI]:
    """Serve ``checkpoint`` with ``flags`` (the ``vllm`` command of this interpreter's
    environment, the user's multiprocessing default, 1 GiB of KV cache) on a socket beside
    ``log``; yields the official OpenAI client talking to it, and stops the server and its
    engine-core child on exit."""
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO")
    with LocalServer(checkpoint, flags, log=log, env=env, uds=log.with_name("vllm.sock")) as server:
        server.wait_healthy(timeout)
        with server.client() as client:
            yield client
