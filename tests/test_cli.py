"""The ``llmgraft`` command as a user runs it (in a subprocess); the demo runs from the README in test_readme.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llmgraft.hooks import LLMGraftError


def run_cli(*args: str, env: dict | None = None) -> str:
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plugins_lists_builtin_and_third_party(plugin_site):
    out = run_cli("plugins", env={"PYTHONPATH": str(plugin_site)})
    assert "sampler top_h from llmgraft: Top-H" in out
    assert "sampler top_a from top_a (llmgraft-top-a): Top-A: keep tokens with p >= a * p_max^2" in out
    assert "  a *        float (per row)  0.2" in out and "keep tokens with p >= a * p_max^2" in out


def run_failing(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one line, no traceback
    return lines[0]


def test_lab_bad_input_is_one_line(tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text('["def f():\\n    "]')
    model = "llmgraft/assets/code-lm"
    assert run_failing("lab", "--model", str(tmp_path / "nope"), "--prompts", str(prompts)) == (
        f"llmgraft: error: model directory '{tmp_path / 'nope'}' does not exist")
    assert run_failing("lab", "--model", str(tmp_path), "--prompts", str(prompts)) == (
        f"llmgraft: error: model directory '{tmp_path}' has no config.json (a Hugging Face model "
        "directory with safetensors weights is expected)")
    (tmp_path / "config.json").write_text("{}")
    assert run_failing("lab", "--model", str(tmp_path), "--prompts", str(prompts)) == (
        f"llmgraft: error: model directory '{tmp_path}' has no *.safetensors weights (the lab loads safetensors "
        "only; re-save the model with save_pretrained(safe_serialization=True))")
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert run_failing("lab", "--model", str(tmp_path), "--prompts", str(prompts)) == (
        f"llmgraft: error: model directory '{tmp_path}' has no tokenizer (tokenizer.json or tokenizer_config.json): "
        "save the tokenizer beside the model")
    assert run_failing("lab", "--model", model, "--prompts", str(prompts), "--samplers", ",") == (
        "llmgraft: error: no sampler to sweep (--samplers is empty)")
    assert run_failing("lab", "--model", model, "--prompts", str(prompts), "--temperature", "0").startswith(
        "llmgraft: error: the sweep temperature must be > 0")
    assert run_failing("lab", "--model", model, "--prompts", str(prompts), "--samples", "1").startswith(
        "llmgraft: error: diversity compares samples of one prompt")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert run_failing("lab", "--model", model, "--prompts", str(empty)) == (
        f"llmgraft: error: prompt file '{empty}' holds no prompts (expected non-empty strings)")
    assert run_failing("lab", "--model", model, "--prompts", str(tmp_path / "missing.json")) == (
        f"llmgraft: error: prompt file '{tmp_path / 'missing.json'}' does not exist")
    assert run_failing("lab", "--model", model, "--prompts", str(prompts), "--samplers", "top_p,top_hh") == (
        "llmgraft: error: unknown sampler 'top_hh' for the lab (did you mean 'top_h'?); available: min_p, p_less, "
        "temperature, top_h, top_nsigma, top_p, top_w")


def test_lab_reads_prompt_files(tmp_path):
    from llmgraft.lab import read_prompts

    (tmp_path / "a.json").write_text('["x = ", "def f():\\n    "]')
    (tmp_path / "b.jsonl").write_text('"x = "\n{"prompt": "def f():\\n    "}\n')
    (tmp_path / "c.txt").write_text("x = \ndef f():\\n    \n")
    for name in ("a.json", "b.jsonl", "c.txt"):
        assert read_prompts(tmp_path / name) == ["x = ", "def f():\n    "], name
    (tmp_path / "d.txt").write_text("[x for x in y]\n")  # a text prompt that starts like JSON
    assert read_prompts(tmp_path / "d.txt") == ["[x for x in y]"]
    (tmp_path / "e.json").write_text('{"prompts": ["x"]}')
    with pytest.raises(LLMGraftError, match="must hold a JSON array of strings, got a dict"):
        read_prompts(tmp_path / "e.json")
