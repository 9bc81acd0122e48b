"""The ``llmgraft`` command as a user runs it (subprocesses, real engine for the demo)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plugins_lists_builtin_and_third_party(plugin_site):
    out = run_cli("plugins", env={"PYTHONPATH": str(plugin_site)})
    assert "sampler  top_h  llmgraft" in out
    assert "top_a" in out and "top_a (llmgraft-top-a)" in out
    assert "alpha: float (per row) = 0.4" in out


@pytest.mark.slow
def test_demo_runs_on_the_bundled_model(tmp_path):
    plot = tmp_path / "demo.png"
    out = run_cli("demo", "--samples", "2", "--max-tokens", "16", "--temperatures", "1.0", "--plot", str(plot),
                  env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    for label in ("vLLM top-p 0.9", "vLLM min-p 0.1", "llmgraft top-h 0.4"):
        assert label in out
    assert "valid Python %" in out and plot.stat().st_size > 10_000
