"""Merging full checkpoints: peak memory and wall time for N inputs, side by side with mergekit.

    python benchmarks/bench_merge.py [--inputs 2 4 8] [--methods task_arithmetic ties consensus mwa uniform tall]
                                     [--size-mb 213] [--no-mergekit] [--out PREFIX]

Builds a random bf16 Llama of about ``--size-mb`` (the base) and 8 "fine-tunes" (the base plus sparse
random changes), written with llmgraft's own streaming shard writer. Every merge runs in a fresh process
under ``/usr/bin/time -v``; memory is its "Maximum resident set size" minus that of
``python -c "import torch, safetensors.torch"`` (the interpreter and torch alone), as a ratio to one input
checkpoint. Target (issue #10): <= 1.5x one input for every method and N <= 8, and <= 0.5x mergekit's on the
same merge. mergekit 0.1.5 is installed into the benchmark's own directory (``pip --target``), never into
the project's environment; its linear and TIES merges are timed on the same inputs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MERGEKIT = "mergekit==0.1.5"

from llmgraft.testing.measure import peak_rss_mb  # noqa: E402


def build_models(directory: Path, size_mb: float, count: int) -> tuple[Path, list[Path]]:
    """A random bf16 Llama of ~size_mb and ``count`` sparse variants of it, streamed to disk."""
    import torch
    from transformers import LlamaConfig

    from llmgraft.offline.checkpoints import ShardWriter

    hidden, inter, vocab = (1024, 2816, 32000) if size_mb >= 100 else (256, 704, 4096)  # small: smoke runs
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((size_mb * 2**20 / 2 - vocab * hidden - hidden) / per_layer))
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=inter, tie_word_embeddings=True,
                         architectures=["LlamaForCausalLM"])
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,))]
        shapes += [(p + f"self_attn.{n}_proj.weight", (hidden, hidden)) for n in "qkvo"]
        shapes += [(p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes.append(("model.norm.weight", (hidden,)))
    paths = []
    for k in range(count + 1):
        path = directory / ("base" if k == 0 else f"ft{k}")
        if (path / "model.safetensors").exists():
            config.save_pretrained(path)
            paths.append(path)
            continue
        path.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(path, [(n, torch.bfloat16, s) for n, s in shapes], max_shard_bytes=1 << 40)
        for index, (name, shape) in enumerate(shapes):
            gen = torch.Generator().manual_seed(index)
            tensor = torch.randn(shape, generator=gen) * 0.02 if len(shape) > 1 else torch.ones(shape)
            if k:
                change = torch.Generator().manual_seed(1000 * k + index)
                tensor += 0.002 * torch.randn(shape, generator=change) * (torch.rand(shape, generator=change) < 0.2)
            writer.write(name, tensor.to(torch.bfloat16))
        writer.close()
        config.save_pretrained(path)
        (path / "trainer_state.json").write_text(json.dumps({"global_step": 100 * k, "log_history": [
            {"loss": 3.0 - 0.1 * k, "step": 100 * k}]}))
        paths.append(path)
    return paths[0], paths[1:]


def ensure_mergekit(site: Path) -> bool:
    if (site / "mergekit").is_dir():
        return True
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                             MERGEKIT, "immutables", "scipy"], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"mergekit could not be installed ({result.stderr.strip().splitlines()[-1:]}): skipped")
        return False
    return True


def mergekit_run(site: Path, method: str, base: Path, inputs: list[Path], out: Path, work: Path) -> tuple[float, float]:
    models = [{"model": str(p), "parameters": {"weight": 1.0, **({"density": 0.2} if method == "ties" else {})}}
              for p in inputs]
    config = {"merge_method": method, "models": models, "dtype": "bfloat16",
              **({"base_model": str(base)} if method != "linear" else {})}
    path = work / f"mergekit-{method}-{len(inputs)}.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    code = ("import sys; from mergekit.scripts.run_yaml import main; "
            f"sys.argv=['mergekit-yaml', {str(path)!r}, {str(out)!r}, '--lazy-unpickle', '--allow-crimes']; main()")
    return peak_rss_mb([sys.executable, "-c", code], env={"PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--methods", nargs="+",
                        default=["task_arithmetic", "ties", "consensus", "mwa", "uniform", "tall"],
                        help="merge methods; 'tall' measures 'tall build' and then 'tall rebuild' of task 0")
    parser.add_argument("--size-mb", type=float, default=213)
    parser.add_argument("--mergekit", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--work", help="directory for the models (kept between runs; default: a temp dir)")
    parser.add_argument("--out", help="write <out>.md")
    args = parser.parse_args()

    from llmgraft.report import report_results

    work = Path(args.work or tempfile.mkdtemp(prefix="llmgraft-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    base, tuned = build_models(work / "models", args.size_mb, max(args.inputs))
    one = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    floor, _ = peak_rss_mb([sys.executable, "-c", "import torch, safetensors.torch"])
    print(f"one checkpoint: {one:.0f} MB; python + torch alone: {floor:.0f} MB peak")
    site = work / "mergekit-site"
    have_mergekit = args.mergekit and ensure_mergekit(site)
    headers = ["method", "N", "llmgraft s", "llmgraft MB", "x one input", "mergekit s", "mergekit MB", "ours / mergekit"]
    rows, failures = [], []
    for n in args.inputs:
        for method in [m for m in args.methods if m != "tall"] + \
                (["tall build", "tall rebuild"] if "tall" in args.methods else []):
            out = work / f"out-{method.replace(' ', '-')}-{n}"
            cli = [sys.executable, "-m", "llmgraft.cli"]
            if method == "tall build":
                argv = [*cli, "tall", "build", "--base", str(base), *map(str, tuned[:n]), "--out", str(out), "--force"]
            elif method == "tall rebuild":  # task 0 from the store just built
                argv = [*cli, "tall", "rebuild", str(work / f"out-tall-build-{n}"), "--task", "0", "--out", str(out),
                        "--force"]
            else:
                argv = [*cli, "merge", "--method", method, *map(str, tuned[:n]), "--out", str(out), "--force"]
                if method != "mwa" and method != "uniform":
                    argv += ["--base", str(base)]
            if method == "consensus" and n < 2:
                continue
            peak, seconds = peak_rss_mb(argv)
            memory = peak - floor
            row = [method, n, seconds, memory, memory / one, "-", "-", "-"]
            theirs = {"task_arithmetic": "task_arithmetic", "ties": "ties", "uniform": "linear"}.get(method)
            if have_mergekit and theirs:
                try:
                    their_peak, their_seconds = mergekit_run(site, theirs, base, tuned[:n], work / f"mk-{method}-{n}", work)
                    their_memory = their_peak - floor
                    row[5:] = [their_seconds, their_memory, memory / their_memory]
                    if memory / their_memory > 0.5:
                        failures.append(f"{method} N={n}: {memory / their_memory:.2f}x mergekit's memory (target 0.5)")
                except RuntimeError as exc:
                    print(f"mergekit {theirs} N={n} failed: {str(exc).splitlines()[-1][:200]}")
            if memory / one > 1.5:
                failures.append(f"{method} N={n}: {memory / one:.2f}x one input (target 1.5)")
            rows.append(row)
            print(f"{method} N={n}: {seconds:.1f} s, {memory:.0f} MB", flush=True)
    title = (f"Merging {one:.0f} MB bf16 checkpoints, peak RSS above python + torch ({floor:.0f} MB), each merge in "
             "a fresh process")
    verdict = "all targets met" if not failures else "targets missed:\n  " + "\n  ".join(failures)
    report_results(args.out, title, headers, rows, notes=verdict)


if __name__ == "__main__":
    main()
