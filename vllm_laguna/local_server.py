"""A ``vllm serve`` process on this machine, as a user starts it: the demo and the end-to-end
tests run the server through this one helper.

``LocalServer`` starts the process at once and returns, so the caller can work while the
engine loads; ``wait_healthy`` blocks until ``/health`` answers; ``client()`` is the official
OpenAI client talking to it; leaving the ``with`` block stops the API server and its
engine-core and worker children.

The server listens on loopback TCP (what the demo shows a user), or with ``uds=PATH`` on a
Unix socket of its own (``vllm serve --uds``): the tests use that, because a TCP port found
free here can be taken by another process before the server binds it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx
    from openai import OpenAI

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
    """``vllm serve MODEL --host 127.0.0.1 --port PORT ARGS...`` (or ``--uds PATH``), output to
    ``log``. ``env`` defaults to this process's environment."""

    def __init__(
        self,
        model: str | Path,
        args: Sequence[str] = (),
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        uds: Path | None = None,
    ):
        self.uds = uds
        if uds is None:
            port = free_port()
            listen = ["--host", HOST, "--port", str(port)]
            self.origin = f"http://{HOST}:{port}"
        else:
            listen = ["--uds", str(uds)]
            self.origin = "http://localhost"  # only a name: every request goes to the socket
        self.url = f"{self.origin}/v1"  # the OpenAI base URL
        self.command = [vllm_command(), "serve", str(model), *listen, *args]
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                self.command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(os.environ if env is None else env),
                start_new_session=True,  # its own process group, so its children stop with it
            )

    def http(self, timeout: float) -> httpx.Client:
        """An HTTP client that reaches this server (over its socket when it has one)."""
        import httpx

        transport = None if self.uds is None else httpx.HTTPTransport(uds=str(self.uds))
        return httpx.Client(transport=transport, timeout=timeout)

    def client(self, timeout: float = 600) -> OpenAI:
        """The official OpenAI client for this server, without retries (a failure shows)."""
        from openai import OpenAI

        return OpenAI(base_url=self.url, api_key="unused", max_retries=0, http_client=self.http(timeout))

    def wait_healthy(self, timeout: float = 900) -> None:
        """Return once ``/health`` answers 200; raise with the log's tail if the server
        exits or ``timeout`` seconds pass first."""
        import httpx

        deadline = time.monotonic() + timeout
        with self.http(timeout=5) as http:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    if http.get(f"{self.origin}/health").status_code == 200:
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
