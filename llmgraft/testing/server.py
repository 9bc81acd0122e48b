"""The OpenAI-compatible server as a subprocess on a free local port, for the server tests and benchmark."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_env(env: dict) -> dict:
    """``env`` for a vLLM server started as the first vLLM process of its tree: without the start-up report
    file that an in-process engine of this process may have named (the server must own its report)."""
    return {k: v for k, v in env.items() if k != "LLMGRAFT_STARTUP_REPORT"}


@contextlib.contextmanager
def openai_server(argv: Sequence[str], log: Path, env: dict, cwd: Path, timeout: float = 240
                  ) -> Iterator[tuple[subprocess.Popen, str]]:
    """Start ``argv`` (a ``vllm.entrypoints.openai.api_server`` command) on 127.0.0.1 and a free port, wait
    until ``/health`` answers, yield (process, base URL), and stop it afterwards. A server that exits or
    does not answer in ``timeout`` seconds is a RuntimeError carrying the end of its log."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([*argv, "--host", "127.0.0.1", "--port", str(port)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=cwd, env=server_env(env))
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not start in {timeout:.0f} s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield proc, base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
