"""Every fenced code block of the README runs here (the server block runs in test_server.py), so the README
cannot drift from what works. Each block carries a ``<!-- readme-test: ... -->`` note naming how."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import PLUGIN_INSTALL, ROOT
from readme_blocks import block, blocks, commands

HANDLED = {"make", "output of make demo", "same as make setup", "output of llmgraft plugins", "run", "mos", "mos-serve", "slim-moe",
           "slim-moe-distributed", "output of llmgraft demo slim-moe", "output of llmgraft demo distill", "quantize",
           "server", "plugin install", "run with the plugin installed", "smoke", "layout", "lab", "merge"}


def run(cmd: list[str] | str, env: dict | None = None, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env={**os.environ, **(env or {})}, shell=isinstance(cmd, str), **kwargs)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_every_block_has_a_test():
    for b in blocks():
        assert b.note in HANDLED or (b.note or "").startswith("file "), \
            f"README line {b.line}: code block without a known <!-- readme-test: ... --> note ({b.note!r})"


@pytest.mark.slow
def test_quickstart_make_demo(tmp_path):
    """``make demo`` as written (smaller), and its output's table as the README shows it."""
    assert commands(block("make").code) == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()  # CI runs the second line itself
    plot = tmp_path / "demo.png"
    out = run(["make", "demo", f"DEMO_PLOT={plot}", "DEMO_ARGS=--samples 2 --max-tokens 16 --temperatures 1.0"],
              env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}).stdout
    header = block("output of make demo").code.splitlines()[0].split()
    shown = next(line for line in out.splitlines() if line.startswith("T  "))
    assert shown.split() == header
    for label in ("vLLM top-p 0.9", "vLLM min-p 0.1", "llmgraft top-h 0.4"):
        assert label in out
    slim = block("output of llmgraft demo slim-moe").code.splitlines()
    assert slim[0] in out and all(line.split("  ")[0] in out for line in slim[2:])
    distill = block("output of llmgraft demo distill").code.splitlines()
    assert distill[0] in out and distill[1].split() == next(l for l in out.splitlines() if "prefill ms/prompt" in l).split()
    assert plot.stat().st_size > 10_000


def test_install_commands_are_what_make_setup_runs():
    recipe = run(["make", "--no-print-directory", "-n", "-B", "setup"]).stdout.splitlines()  # CI runs us under make
    made = [line.split("||")[-1].strip() for line in recipe if not line.startswith("touch ")]
    assert commands(block("same as make setup").code) == made


def test_plugins_listing_is_the_real_output():
    shown = block("output of llmgraft plugins").code.splitlines()
    assert shown[0] == "$ llmgraft plugins"
    out = run([sys.executable, "-m", "llmgraft.cli", "plugins"], env={"LLMGRAFT_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert out.stdout.rstrip("\n").splitlines() == shown[1:]


@pytest.mark.engine
@pytest.mark.parametrize("index", range(len([b for b in blocks() if b.note == "run"])))
def test_python_blocks_run(index):
    code = [b for b in blocks() if b.note == "run"][index].code
    out = run([sys.executable, "-c", code], env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    assert out.stdout.strip(), "the block prints a completion"


def test_contract_block_runs_with_the_plugin_installed(plugin_site):
    run([sys.executable, "-c", block("run with the plugin installed").code], env={"PYTHONPATH": str(plugin_site)})


@pytest.mark.parametrize("note", [b.note for b in blocks() if (b.note or "").startswith("file ")])
def test_plugin_files_are_the_tested_fixture(note):
    path = ROOT / note.removeprefix("file ")
    assert block(note).code == path.read_text().rstrip("\n")


def test_plugin_install_command_is_the_one_the_tests_run(plugin_site):
    assert commands(block("plugin install").code) == [PLUGIN_INSTALL]
    assert (plugin_site / "llmgraft_top_a.py").exists()


SMOKE_ARGS = {"bench_top_h.py": ["--runs", "1", "--repeats", "3", "--batches", "1", "--vocabs", "4096",
                                 "--no-context"],
              "bench_samplers.py": ["--runs", "1", "--repeats", "2", "--official-repeats", "1", "--threshold-repeats",
                                    "2", "--batches", "2", "--vocabs", "4096"],
              "bench_decode.py": ["--requests", "4", "--max-tokens", "8", "--repeats", "1"],
              "bench_server.py": ["--requests", "60", "--warmup", "10", "--concurrency", "8"],
              "bench_merge.py": ["--inputs", "2", "--methods", "uniform", "ties", "--size-mb", "6", "--no-mergekit"],
              "bench_mos.py": ["--quick", "--steps", "3", "--seeds", "1"],
              "bench_adapter_merge_quality.py": ["--steps", "4", "--tasks", "json", "html"],
              "bench_slim_moe.py": ["--teacher-steps", "2", "--tokens", "1024", "--targets", "0.5", "--no-vllm"],
              "bench_prompt_distill.py": ["--lengths", "256", "--repeats", "1", "--prompts", "8", "--ratios", "0.25",
                                          "--requests", "2", "--tokens", "4"],
              "bench_quant.py": ["--sizes", "512", "--rows", "1", "--repeats", "2", "--no-vllm"]}


@pytest.mark.engine
def test_benchmark_commands_run_small(tmp_path):
    for command in commands(block("smoke").code):
        argv = command.split()
        assert argv[0] == ".venv/bin/python" and argv[argv.index("--out") - 1].startswith("benchmarks/")
        script = Path(argv[1]).name
        out = tmp_path / script
        argv[argv.index("--out") + 1] = str(out)  # never overwrite the committed results
        run([sys.executable, *argv[1:], *SMOKE_ARGS[script]], env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
        assert out.with_suffix(".md").stat().st_size > 100


@pytest.mark.engine
def test_lab_command_runs_small(tmp_path):
    """The README's lab command as written, with every sampler, on fewer points, samples and tokens."""
    argv = commands(block("lab").code)[0].split()
    assert argv[:2] == ["llmgraft", "lab"]
    argv[argv.index("--out") + 1] = str(tmp_path / "lab")
    out = run([sys.executable, "-m", "llmgraft.cli", *argv[1:], "--quick", "--samples", "2", "--max-tokens", "6"],
              env={"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}).stdout
    table = (tmp_path / "lab" / "lab.md").read_text()
    for name in ("temperature", "top_p", "min_p", "top_h:reference", "top_h:paper", "top_w", "top_nsigma", "p_less"):
        assert f"| {name} |" in table
    assert (tmp_path / "lab" / "frontier.png").stat().st_size > 10_000 and "matches or beats min-p" in out


def test_layout_lists_real_folders():
    for line in block("layout").code.splitlines():
        folder = re.split(r"\s{2,}", line)[0]
        assert (ROOT / folder).is_dir(), folder


def test_quantize_commands_run_as_written(tmp_path):
    for command in commands(block("quantize").code):
        argv = command.split()
        assert argv[:2] == ["llmgraft", "quantize"]
        out = tmp_path / Path(argv[argv.index("--out") + 1]).name
        argv[argv.index("--out") + 1] = str(out)
        run([sys.executable, "-m", "llmgraft.cli", *argv[1:]])
        assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"].startswith("llmgraft-")


def test_slim_moe_command_runs_as_written(tmp_path):
    from llmgraft.testing.models import build_tiny_mixtral

    (command,) = commands(block("slim-moe").code)
    model = build_tiny_mixtral(tmp_path / "my-mixtral")
    (tmp_path / "calib.txt").write_text((ROOT / "llmgraft" / "cli.py").read_text() * 4)
    argv = command.replace("--tokens 262144", "--tokens 4096").split()
    assert argv[0] == "llmgraft"
    result = subprocess.run([sys.executable, "-m", "llmgraft.cli", *argv[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "my-mixtral-slim" / "config.json").is_file() and model.is_dir()


def test_slim_moe_distributed_command_names_real_options():
    (command,) = commands(block("slim-moe-distributed").code)
    argv = command.split()
    assert argv[:2] == ["accelerate", "launch"] and argv[argv.index("-m") + 1:argv.index("-m") + 3] == [
        "llmgraft.integrations.transformers.host", "distil"]
    usage = run([sys.executable, "-m", "llmgraft.integrations.transformers.host", "distil", "--help"]).stdout
    for flag in (a for a in argv[argv.index("distil") + 1:] if a.startswith("--")):
        assert flag in usage, flag
