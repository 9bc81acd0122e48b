"""Mixed request load for the OpenAI-compatible server: the test under load and ``benchmarks/bench_server.py``.

Each request carries its expectation: valid ones (no ``vllm_xargs``, every built-in sampler, a third-party
sampler, opting out) must complete with HTTP 200; invalid ones (out-of-range, unknown sampler, wrong types,
misspelt fields) must get HTTP 400 with a message naming the offending field. Streaming requests may hang up
after the first chunk, as impatient clients do.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

#: (fields, expected HTTP status, a fragment the error message must contain)
VALID: list[dict[str, Any] | None] = [
    None,                                                   # the server's default sampler
    {"top_h": 0.4}, {"top_h": 0.7, "top_h_variant": "paper"}, {"top_h": 0.3, "variant": "hf"},
    {"llmgraft_sampler": "top_w"}, {"top_w": 4.0, "top_w_lam": 1.5},
    {"top_nsigma": 1.0}, {"llmgraft_sampler": "p_less"}, {"p_less": 3, "p_less_variant": "p_less"},
    {"llmgraft_sampler": "top_a", "top_a_a": 0.5},          # the third-party fixture plugin
    {"llmgraft_sampler": "none"},                           # opt out of the default
]
INVALID: list[tuple[dict[str, Any], str]] = [
    ({"top_h": 0}, "alpha must be in"), ({"top_h": 2.0}, "alpha must be in"),
    ({"llmgraft_sampler": "top_zz"}, "llmgraft_sampler: no sampler named 'top_zz'"),
    ({"top_h": "high"}, "alpha must be a number"),
    ({"top_w": -1.0}, "beta must be in"), ({"top_w_top_m": 1.5}, "top_m must be an integer"),
    ({"top_nsigma": "x"}, "n must be a number"), ({"p_less": 0.5}, "order must be in"),
    ({"top_h": 0.4, "top_h_alpah": 0.3}, "'alpah' (did you mean 'alpha'?)"),
]


@dataclass
class Request:
    fields: dict[str, Any] | None
    status: int                      # expected
    fragment: str = ""               # expected in the error message
    stream: bool = False
    hang_up: bool = False            # close the connection after the first streamed chunk
    seed: int = 0


@dataclass
class Outcome:
    request: Request
    status: int
    latency: float
    message: str = ""
    ok: bool = False


def mixed_requests(count: int, seed: int = 0, invalid_share: float = 0.2, stream_share: float = 0.0,
                   hang_up_share: float = 0.0, samplers: bool = True) -> list[Request]:
    """``count`` requests drawn from the mix above (every kind at least once when ``count`` allows); without
    ``samplers``, valid requests carry no llmgraft field (the server default applies)."""
    rng = random.Random(seed)
    kinds: list[Request] = [Request(f, 200) for f in VALID] if samplers else [Request(None, 200)]
    if invalid_share > 0:
        kinds += [Request(f, 400, frag) for f, frag in INVALID]
    out = [kinds[i] for i in range(min(count, len(kinds)))]
    while len(out) < count:
        if rng.random() < invalid_share:
            f, frag = rng.choice(INVALID)
            out.append(Request(f, 400, frag))
        else:
            out.append(Request(rng.choice(VALID) if samplers else None, 200))
    for i, r in enumerate(out):
        r.seed = i
        if r.status == 200 and rng.random() < stream_share:
            r.stream = True
            r.hang_up = rng.random() < hang_up_share
    rng.shuffle(out)
    return out


def send(base: str, request: Request, prompt: str = "def main():\n    ", max_tokens: int = 16,
         timeout: float = 120) -> Outcome:
    body: dict[str, Any] = {"model": "code-lm", "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0,
                            "seed": request.seed, "stream": request.stream}
    if request.fields is not None:
        body["vllm_xargs"] = request.fields
    http = urllib.request.Request(f"{base}/v1/completions", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(http, timeout=timeout) as reply:
            status = reply.status
            if request.stream:
                for line in reply:
                    if request.hang_up and line.strip():
                        break  # closing the connection mid-stream
                    if line.strip() == b"data: [DONE]":
                        break
            else:
                json.loads(reply.read())
            message = ""
    except urllib.error.HTTPError as exc:
        status, message = exc.code, exc.read().decode(errors="replace")
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
        status, message = -1, f"{type(exc).__name__}: {exc}"
    outcome = Outcome(request, status, time.perf_counter() - start, message)
    outcome.ok = status == request.status and (status != 400 or request.fragment in message)
    return outcome


def fire(base: str, requests: list[Request], concurrency: int, progress=None, **kwargs) -> list[Outcome]:
    """Send every request with at most ``concurrency`` in flight; ``progress`` (a tqdm) is updated."""
    def one(r):
        outcome = send(base, r, **kwargs)
        if progress is not None:
            progress.update(1)
        return outcome

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, requests))


@dataclass
class Summary:
    count: int
    unexpected: list[Outcome] = field(default_factory=list)
    by_class: Counter = field(default_factory=Counter)
    p50: float = 0.0
    p99: float = 0.0


def summarise(outcomes: list[Outcome]) -> Summary:
    summary = Summary(len(outcomes))
    for o in outcomes:
        kind = "stream, hung up" if o.request.hang_up else "stream" if o.request.stream else "plain"
        summary.by_class[f"HTTP {o.status} ({kind})" if o.ok else f"UNEXPECTED HTTP {o.status}"] += 1
        if not o.ok:
            summary.unexpected.append(o)
    latencies = sorted(o.latency for o in outcomes if o.ok and o.status == 200 and not o.request.hang_up)
    if latencies:
        summary.p50 = statistics.median(latencies)
        summary.p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    return summary
