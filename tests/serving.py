"""``vllm serve`` as a real process, for the end-to-end tests.

The server listens on a Unix socket of its own (``vllm serve --uds``): no TCP port is chosen
by the test and then bound by the server, so no other process can take it in between."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx
    from openai import OpenAI


def http_over(socket_path: Path, timeout: float) -> httpx.Client:
    """An HTTP client whose every request goes to the server's Unix socket (the host in a
    URL is then only a name)."""
    import httpx

    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket_path)), timeout=timeout)


def wait_healthy(socket_path: Path, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with http_over(socket_path, timeout=5) as http:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if http.get("http://localhost/health").status_code == 200:
                    return
            except httpx.TransportError:  # not listening yet
                pass
            time.sleep(2)
    raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def vllm_serve(checkpoint: Path, log: Path, *flags: str, timeout: float = 900) -> Iterator[OpenAI]:
    """Serve ``checkpoint`` with ``flags`` (the ``vllm`` command of this interpreter's
    environment, the user's multiprocessing default, 1 GiB of KV cache) on a socket beside
    ``log``; yields the official OpenAI client talking to it, and stops the server and its
    engine-core child on exit."""
    from openai import OpenAI

    socket_path = log.with_name("vllm.sock")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_LOGGING_LEVEL="INFO")
    command = [str(Path(sys.executable).with_name("vllm")), "serve", str(checkpoint), "--uds", str(socket_path), *flags]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_healthy(socket_path, proc, log, timeout=timeout)
        with http_over(socket_path, timeout=600) as http:
            yield OpenAI(base_url="http://localhost/v1", api_key="unused", max_retries=0, http_client=http)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
