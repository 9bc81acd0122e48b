"""The OpenAI-compatible server as a user runs it: a separate engine-core process, ``--additional-config``
server defaults, ``vllm_xargs`` request fields, HTTP 400 on bad values, and a third-party sampler."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_llama, plugin_site, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH=str(plugin_site))
    default = {"llmgraft": {"sampler": "top_h", "top_h": 0.01}}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_llama),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "512", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager",
           "--max-num-seqs", "8", "--additional-config", json.dumps(default)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.time() > deadline:
                pytest.fail(f"server did not start in 240 s:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def complete(base: str, **body) -> tuple[int, dict]:
    body = {"model": "tiny", "prompt": "def main():\n    ", "max_tokens": 16, "seed": 7, "ignore_eos": True,
            **body}
    request = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def text(reply: dict) -> str:
    return reply["choices"][0]["text"]


def test_server_default_request_fields_and_errors(server):
    status, greedy = complete(server, temperature=0.0)
    assert status == 200
    # The server default (top_h alpha 0.01) keeps only the top token: hot sampling collapses to greedy.
    status, hot_default = complete(server, temperature=2.0)
    assert status == 200 and text(hot_default) == text(greedy)
    status, hot_plain = complete(server, temperature=2.0, vllm_xargs={"llmgraft_sampler": "none"})
    assert status == 200 and text(hot_plain) != text(greedy)
    status, _ = complete(server, temperature=2.0, vllm_xargs={"top_h": 0.5, "top_h_variant": "hf"})
    assert status == 200

    status, error = complete(server, temperature=1.0, vllm_xargs={"top_h": 5})
    assert status == 400 and "alpha must be in (0, 1]" in json.dumps(error)
    status, error = complete(server, temperature=1.0, vllm_xargs={"llmgraft_sampler": "nope"})
    assert status == 400 and "no sampler named 'nope'" in json.dumps(error)


def test_third_party_sampler_runs_in_the_engine_process(server):
    status, _ = complete(server, temperature=1.0, vllm_xargs={"llmgraft_sampler": "top_a", "top_a_a": 0.3})
    assert status == 200
    with urllib.request.urlopen(f"{server}/health", timeout=5) as r:  # the engine core survived the batch
        assert r.status == 200
