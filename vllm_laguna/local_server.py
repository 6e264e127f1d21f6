"""A ``vllm serve`` process on loopback, as a user starts it: the demo and the end-to-end
tests run the server through this one helper.

``LocalServer`` starts the process at once and returns, so the caller can work while the
engine loads; ``wait_healthy`` blocks until ``/health`` answers; leaving the ``with`` block
stops the API server and its engine-core and worker children.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

HOST = "127.0.0.1"


def vllm_command() -> str:
    """The ``vllm`` script of this interpreter's environment."""
    return str(Path(sys.executable).with_name("vllm"))


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class LocalServer:
    """``vllm serve MODEL --host 127.0.0.1 --port PORT ARGS...``, output to ``log``.

    ``env`` defaults to this process's environment. ``url`` is the OpenAI base URL
    (``http://127.0.0.1:PORT/v1``)."""

    def __init__(
        self, model: str | Path, args: Sequence[str] = (), *, log: Path, env: Mapping[str, str] | None = None
    ):
        self.port = free_port()
        self.command = [vllm_command(), "serve", str(model), "--host", HOST, "--port", str(self.port), *args]
        self.log = log
        self.url = f"http://{HOST}:{self.port}/v1"
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ if env is None else env),
                start_new_session=True,  # its own process group, so its children stop with it
            )

    def wait_healthy(self, timeout: float = 900) -> None:
        """Return once ``/health`` answers 200; raise with the log's tail if the server
        exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        health = f"http://{HOST}:{self.port}/health"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(health, timeout=5) as response:
                    if response.status == 200:
                        return
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not healthy after {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM the process group (the API server and its engine core), SIGKILL after 60 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
