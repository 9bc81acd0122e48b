"""The OpenAI-compatible server under a long mixed load: every sampler, a third-party plugin, invalid
parameters, streaming clients that hang up mid-stream.

    python benchmarks/bench_server.py [--requests 10000] [--concurrency 64] [--out PREFIX]

Starts ``python -m vllm.entrypoints.openai.api_server`` on the bundled code LM exactly as the README does
(``--additional-config`` sets Top-H as the default sampler), with the third-party fixture plugin Top-A
installed beside it. After a warm-up of 500 requests, it fires ``--requests`` more (``llmgraft.testing.load``:
20% invalid, 30% streaming, a third of those hanging up after the first chunk), at most ``--concurrency``
in flight, and reports the outcomes by class, the latency of completed requests, and the server's resident
memory (API server plus engine core) before, after each quarter of the load, and after. Required: 0 unexpected outcomes and RSS growth
<= 20 MB; latency is reported, not bounded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--plain", action="store_true",
                        help="send no llmgraft fields (only the server default): vLLM's own baseline")
    parser.add_argument("--out", help="also write <out>.md")
    args = parser.parse_args()

    from tqdm import tqdm

    from llmgraft.report import format_table, markdown_table
    from llmgraft.testing.load import fire, mixed_requests, summarise

    scratch = Path(tempfile.mkdtemp(prefix="llmgraft-server-"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(scratch / "site"),
                    str(ROOT / "tests" / "plugins" / "llmgraft-top-a")], check=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="1", PYTHONPATH=str(scratch / "site"))
    log = open(scratch / "server.log", "w")
    proc = subprocess.Popen([*_server_argv(), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager",
                             "--max-num-seqs", str(args.concurrency)], stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                sys.exit(f"server exited:\n{(scratch / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2):
                    break
            except OSError:
                if time.time() > deadline:
                    sys.exit("server did not start in 300 s")
                time.sleep(1)
        mix = dict(invalid_share=0.0 if args.plain else 0.2, stream_share=0.3, hang_up_share=1 / 3,
                   samplers=not args.plain)
        with tqdm(total=args.warmup, desc="warm-up", unit="req") as bar:
            fire(base, mixed_requests(args.warmup, seed=0, **mix), args.concurrency, progress=bar)
        time.sleep(2)
        before_by = _rss_by_process(proc.pid)
        before = sum(before_by.values())
        requests = mixed_requests(args.requests, seed=1, **mix)
        quarter = -(-len(requests) // 4)
        outcomes, rss = [], [before]
        start = time.perf_counter()
        with tqdm(total=args.requests, desc="load", unit="req") as bar:
            for i in range(0, len(requests), quarter):  # RSS after each quarter: a plateau or a slope
                outcomes += fire(base, requests[i:i + quarter], args.concurrency, progress=bar)
                rss.append(_rss_mb(proc.pid))
        seconds = time.perf_counter() - start
        time.sleep(2)
        after_by = _rss_by_process(proc.pid)
        after = sum(after_by.values())
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            healthy = r.status == 200
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()

    summary = summarise(outcomes)
    rows = [[k, v] for k, v in sorted(summary.by_class.items())]
    title = (f"OpenAI server, bundled code LM, {args.requests:,} mixed requests (every sampler, a third-party "
             f"plugin, 20% invalid, 30% streaming, a third of streams hung up), <= {args.concurrency} in flight")
    figures = [["requests", args.requests], ["seconds", seconds], ["requests/s", args.requests / seconds],
               ["unexpected outcomes", len(summary.unexpected)],
               ["latency p50 s (completed, not hung up)", summary.p50], ["latency p99 s", summary.p99],
               ["server RSS before MB", before], ["server RSS after MB", after],
               ["RSS after each quarter MB", " · ".join(f"{r:,.0f}" for r in rss[1:])],
               *[[f"  {name}: before -> after MB", f"{before_by[name]:,.0f} -> {after_by.get(name, 0):,.0f}"]
                 for name in before_by],
               ["RSS growth MB (target <= 20)", after - before], ["healthy afterwards", str(healthy)]]
    print()
    print(format_table(["outcome", "count"], rows, title=title))
    print()
    print(format_table(["figure", "value"], figures))
    for o in summary.unexpected[:10]:
        print(f"  unexpected: {o.request.fields} -> HTTP {o.status} {o.message[:160]}")
    ok = not summary.unexpected and after - before <= 20 and healthy
    verdict = "all requirements met" if ok else "requirements missed"
    print(f"\n{verdict}")
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n{markdown_table(['outcome', 'count'], rows)}\n\n"
                       f"{markdown_table(['figure', 'value'], figures)}\n\n{verdict}\n")
        print(f"written: {out}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
