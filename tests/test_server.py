"""The OpenAI-compatible server as the README starts it: a separate engine-core process, the
``--additional-config`` default, ``vllm_xargs`` request fields, HTTP 400s, a third-party sampler, and a bad
server config that must stop the server with its reason in the last line."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import ROOT
from readme_blocks import block

from llmgraft.testing.server import free_port, openai_server

pytestmark = pytest.mark.slow


def readme_server() -> tuple[list[str], str]:
    """The README's server command (as argv) and its curl command (as a shell snippet)."""
    code = block("server").code
    server, _, curl = code.partition(" &\n")
    argv = shlex.split(server.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"]
    return [sys.executable, *argv[1:]], curl.strip()


def _start(argv: list[str], log, env: dict) -> subprocess.Popen:
    from llmgraft.testing.server import server_env

    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=server_env(env))


@pytest.fixture(scope="module")
def server(plugin_site, tmp_path_factory):
    argv, curl = readme_server()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH=str(plugin_site))
    try:
        with openai_server([*argv, "--max-num-seqs", "8", "--enforce-eager"], log, env, ROOT) as (_, base):
            yield base, curl.replace("localhost:8000", base.removeprefix("http://"))
    except RuntimeError as exc:
        pytest.fail(str(exc))


def complete(base: str, **body) -> tuple[int, dict]:
    body = {"model": "code-lm", "prompt": "def main():\n    ", "max_tokens": 16, "seed": 7, "ignore_eos": True,
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


def test_readme_curl(server):
    _, curl = server
    reply = json.loads(subprocess.run(curl, shell=True, capture_output=True, text=True, check=True).stdout)
    assert reply["choices"][0]["text"] and reply["usage"]["completion_tokens"] == 32


def test_server_default_request_fields_and_errors(server):
    base, _ = server
    status, greedy = complete(base, temperature=0.0)
    assert status == 200
    # A tiny alpha keeps only the top token: hot sampling collapses to greedy; opting out does not.
    status, collapsed = complete(base, temperature=2.0, vllm_xargs={"top_h": 0.001})
    assert status == 200 and text(collapsed) == text(greedy)
    status, hot_plain = complete(base, temperature=2.0, vllm_xargs={"llmgraft_sampler": "none"})
    assert status == 200 and text(hot_plain) != text(greedy)
    status, _ = complete(base, temperature=2.0, vllm_xargs={"top_h": 0.5, "variant": "hf"})
    assert status == 200

    for fields, message in (({"top_h": 5}, "alpha must be in (0, 1]"),
                            ({"llmgraft_sampler": "nope"}, "llmgraft_sampler: no sampler named 'nope'"),
                            ({"llmgraft_sampler": "top_h", "alpah": 0.3}, "did you mean 'alpha'")):
        status, error = complete(base, temperature=1.0, vllm_xargs=fields)
        assert status == 400 and message in json.dumps(error), error


def test_json_true_arrives_as_one(server):
    """The documented HTTP limitation: vLLM's schema turns true into 1 before llmgraft sees it."""
    base, _ = server
    status, _ = complete(base, temperature=1.0, vllm_xargs={"top_h": True})
    assert status == 200  # ran as alpha = 1 (offline, HF and --additional-config reject a bool)


def test_third_party_sampler_runs_in_the_engine_process(server):
    base, _ = server
    status, _ = complete(base, temperature=1.0, vllm_xargs={"llmgraft_sampler": "top_a", "a": 0.3})
    assert status == 200
    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:  # the engine core survived the batch
        assert r.status == 200


def test_bad_server_config_stops_with_its_reason_last(tmp_path):
    argv, _ = readme_server()
    config = argv.index("--additional-config") + 1
    argv[config] = json.dumps({"llmgraft": {"sampler": "top_h", "top_h": 5}})
    log = tmp_path / "bad.log"
    with open(log, "w") as out:
        proc = _start([*argv, "--host", "127.0.0.1", "--port", str(free_port()), "--enforce-eager"], out,
                      dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1"))
        assert proc.wait(240) != 0
    last = log.read_text().rstrip().splitlines()[-1]
    assert last == ("llmgraft: vLLM could not start: invalid --additional-config 'llmgraft' section: "
                    "top_h: alpha must be in (0, 1], got 5.0")


def test_server_under_mixed_load(server):
    """200 concurrent requests mixing no fields, every built-in sampler, a third-party one and invalid
    parameters: each valid one completes, each invalid one is a 400 naming the field, the server stays up."""
    from llmgraft.testing.load import fire, mixed_requests, summarise

    base, _ = server
    requests = mixed_requests(200, seed=1, invalid_share=0.25)
    assert {tuple(sorted((r.fields or {}).items())) for r in requests if r.status == 400} and \
        any(r.fields and r.fields.get("llmgraft_sampler") == "top_w" for r in requests)
    start = time.perf_counter()
    summary = summarise(fire(base, requests, concurrency=200))
    seconds = time.perf_counter() - start
    assert not summary.unexpected, [(o.request, o.status, o.message[:200]) for o in summary.unexpected[:5]]
    assert sum(n for k, n in summary.by_class.items() if k.startswith("HTTP 400")) == \
        sum(r.status == 400 for r in requests)
    with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
        assert r.status == 200
    status, _ = complete(base, temperature=1.0, vllm_xargs={"llmgraft_sampler": "top_w"})
    assert status == 200
    print(f"\n200 mixed requests in {seconds:.1f} s: {dict(summary.by_class)}; "
          f"p50 {summary.p50:.2f} s, p99 {summary.p99:.2f} s")


@pytest.mark.parametrize("fields", [None, {"top_h": 0.6}, {"llmgraft_sampler": "top_w", "top_w": 6.0},
                                    {"top_nsigma": 1.5}, {"llmgraft_sampler": "p_less"},
                                    {"llmgraft_sampler": "top_a", "a": 0.3}, {"llmgraft_sampler": "none"}],
                         ids=["default", "top_h", "top_w", "top_nsigma", "p_less", "top_a", "none"])
def test_same_seed_same_output(server, fields):
    """The same request with the same seed, sent alone, gives the same text for every sampler."""
    base, _ = server
    extra = {} if fields is None else {"vllm_xargs": fields}
    first = complete(base, temperature=1.5, max_tokens=24, seed=11, **extra)
    second = complete(base, temperature=1.5, max_tokens=24, seed=11, **extra)
    assert first[0] == second[0] == 200 and text(first[1]) == text(second[1])
