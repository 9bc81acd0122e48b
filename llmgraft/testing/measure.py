"""Peak memory of a command, as GNU time reports it: the figure the merging targets are stated in."""

from __future__ import annotations

import os
import re
import subprocess
import time


def run_with_peak_rss(argv: list[str], env: dict | None = None) -> tuple[str, float, float]:
    """(stdout, peak resident MB, wall seconds) of a command, from ``/usr/bin/time -v``; raises on failure."""
    start = time.perf_counter()
    result = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True,
                            env={**os.environ, **(env or {})})
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{argv[:4]} failed:\n{result.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return result.stdout, kb / 1024, seconds


def peak_rss_mb(argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(peak resident MB, wall seconds) of a command."""
    return run_with_peak_rss(argv, env)[1:]
