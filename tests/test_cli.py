"""The ``llmgraft`` command as a user runs it (in a subprocess); the demo runs from the README in test_readme.py."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plugins_lists_builtin_and_third_party(plugin_site):
    out = run_cli("plugins", env={"PYTHONPATH": str(plugin_site)})
    assert "sampler top_h from llmgraft: Top-H" in out
    assert "sampler top_a from top_a (llmgraft-top-a): Top-A: keep tokens with p >= a * p_max^2" in out
    assert "  a          float (per row)  0.2" in out and "keep tokens with p >= a * p_max^2" in out
