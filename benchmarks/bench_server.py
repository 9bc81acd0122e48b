"""The OpenAI-compatible server under a long mixed load: every sampler, a third-party plugin, invalid
parameters, streaming clients that hang up mid-stream.

    python benchmarks/bench_server.py [--requests 10000] [--concurrency 64] [--out PREFIX]

Starts ``python -m vllm.entrypoints.openai.api_server`` on the bundled code LM exactly as the README does
(``--additional-config`` sets Top-H as the default sampler), with the third-party fixture plugin Top-A
installed beside it. After a warm-up of 500 requests, it fires ``--requests`` more (``llmgraft.testing.load``:
20% invalid, 30% streaming, a third of those hanging up after the first chunk), at most ``--concurrency``
in flight, and reports the outcomes by class, the latency of completed requests, and the server's resident
memory (all its processes) before, after each quarter of the load, and after.

The same load without llmgraft (no default sampler, no fields, nothing invalid) runs first on a fresh
server: vLLM's CPU worker itself grows by ~100 MB over 10,000 requests here, so llmgraft's share is the
difference. Required: 0 unexpected outcomes and llmgraft's growth beyond vLLM's own <= 20 MB; latency is
reported, not bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _server_argv() -> list[str]:
    sys.path.insert(0, str(ROOT / "tests"))
    from readme_blocks import block

    server = block("server").code.partition(" &\n")[0]
    argv = shlex.split(server.replace("\\\n", " "))
    return [sys.executable, *argv[1:]]


def _rss_mb(pid: int) -> float:
    return sum(_rss_by_process(pid).values())


def _rss_by_process(pid: int) -> dict[str, float]:
    """Resident MB of the API server and each child (the engine core), by process name."""
    import psutil

    process = psutil.Process(pid)
    out = {}
    for p in [process, *process.children(recursive=True)]:
        try:
            name = "api server" if p.pid == pid else " ".join(p.cmdline()[:3])[:60] or p.name()
            out[f"{name} ({p.pid})"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            pass
    return out


def run_load(args, scratch: Path, plain: bool) -> dict:
    """One server, warm-up, then the load; returns outcomes, timings and RSS figures.

    ``plain``: vLLM alone (no --additional-config default, no llmgraft request fields, nothing invalid)."""
    from tqdm import tqdm

    from llmgraft.testing.load import fire, mixed_requests
    from llmgraft.testing.server import openai_server

    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH=str(scratch / "site"))
    argv = _server_argv()
    if plain:
        at = argv.index("--additional-config")
        del argv[at:at + 2]
    log_path = scratch / f"server-{'plain' if plain else 'llmgraft'}.log"
    label = "vLLM alone" if plain else "llmgraft mix"
    with contextlib.ExitStack() as stack:
        try:
            proc, base = stack.enter_context(openai_server(
                [*argv, "--enforce-eager", "--max-num-seqs", str(args.concurrency)], log_path, env, ROOT, timeout=300))
        except RuntimeError as exc:
            sys.exit(str(exc))
        mix = dict(invalid_share=0.0 if plain else 0.2, stream_share=0.3, hang_up_share=1 / 3, samplers=not plain)
        with tqdm(total=args.warmup, desc=f"{label}: warm-up", unit="req") as bar:
            fire(base, mixed_requests(args.warmup, seed=0, **mix), args.concurrency, progress=bar)
        time.sleep(2)
        before = _rss_by_process(proc.pid)
        requests = mixed_requests(args.requests, seed=1, **mix)
        quarter = -(-len(requests) // 4)
        outcomes, rss = [], []
        start = time.perf_counter()
        with tqdm(total=args.requests, desc=f"{label}: load", unit="req") as bar:
            for i in range(0, len(requests), quarter):  # RSS after each quarter: a plateau or a slope
                outcomes += fire(base, requests[i:i + quarter], args.concurrency, progress=bar)
                rss.append(_rss_mb(proc.pid))
        seconds = time.perf_counter() - start
        time.sleep(2)
        after = _rss_by_process(proc.pid)
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            healthy = r.status == 200
    return {"outcomes": outcomes, "seconds": seconds, "before": before, "after": after, "rss": rss,
            "healthy": healthy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--out", help="also write <out>.md")
    args = parser.parse_args()

    from llmgraft.report import format_table, markdown_table
    from llmgraft.testing.load import summarise

    scratch = Path(tempfile.mkdtemp(prefix="llmgraft-server-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(scratch / "site"),
                    str(ROOT / "tests" / "plugins" / "llmgraft-top-a")], check=True)
    runs = {"vLLM alone": run_load(args, scratch, plain=True), "llmgraft mix": run_load(args, scratch, plain=False)}

    summary = summarise(runs["llmgraft mix"]["outcomes"])
    baseline = summarise(runs["vLLM alone"]["outcomes"])
    rows = [[k, v] for k, v in sorted(summary.by_class.items())]
    title = (f"OpenAI server, bundled code LM, {args.requests:,} requests, <= {args.concurrency} in flight: the "
             "llmgraft mix (every sampler, a third-party plugin, 20% invalid, 30% streaming, a third of streams "
             "hung up) against vLLM alone (no llmgraft default or field), each on a fresh server")

    def growth(run):
        return sum(run["after"].values()) - sum(run["before"].values())

    figures = [["figure", "vLLM alone", "llmgraft mix"]]
    for label, get in (
            ("requests/s", lambda r, s: f"{args.requests / r['seconds']:.1f}"),
            ("unexpected outcomes", lambda r, s: str(len(s.unexpected))),
            ("latency p50 / p99 s (completed, not hung up)", lambda r, s: f"{s.p50:.3f} / {s.p99:.3f}"),
            ("RSS before MB", lambda r, s: f"{sum(r['before'].values()):,.0f}"),
            ("RSS after each quarter MB", lambda r, s: " · ".join(f"{x:,.0f}" for x in r["rss"])),
            ("RSS growth MB", lambda r, s: f"{growth(r):+.1f}"),
            ("  of which the vLLM worker (model, samplers)", lambda r, s: f"{_worker_growth(r):+.1f}"),
            ("  of which the API server (the rest)", lambda r, s: f"{growth(r) - _worker_growth(r):+.1f}"),
            ("healthy afterwards", lambda r, s: str(r["healthy"]))):
        figures.append([label, get(runs["vLLM alone"], baseline), get(runs["llmgraft mix"], summary)])
    excess = growth(runs["llmgraft mix"]) - growth(runs["vLLM alone"])
    figures.append(["llmgraft's RSS growth beyond vLLM's own MB (target <= 20)", "", f"{excess:+.1f}"])
    print()
    print(format_table(["outcome (llmgraft mix)", "count"], rows, title=title))
    print()
    print(format_table(figures[0], figures[1:]))
    for o in summary.unexpected[:10]:
        print(f"  unexpected: {o.request.fields} -> HTTP {o.status} {o.message[:160]}")
    ok = not summary.unexpected and not baseline.unexpected and excess <= 20 and runs["llmgraft mix"]["healthy"]
    verdict = "all requirements met" if ok else "requirements missed"
    print(f"\n{verdict}")
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n{markdown_table(['outcome (llmgraft mix)', 'count'], rows)}\n\n"
                       f"{markdown_table(figures[0], figures[1:])}\n\n{verdict}\n")
        print(f"written: {out}")
    sys.exit(0 if ok else 1)


def _worker_growth(run: dict) -> float:
    return sum(run["after"].get(k, 0) - v for k, v in run["before"].items() if "Worker" in k)


if __name__ == "__main__":
    main()
