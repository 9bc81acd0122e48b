"""``llmgraft demo``: a real vLLM engine on the bundled code LM, sampling with vLLM's top-p and min-p and
llmgraft's Top-H, scored on kept-set size, diversity and syntax validity.

Kept-set sizes are measured independently of the engine: an HF forward pass over each completion gives the
logits at every step, and each sampler's own rule is applied to them (vLLM's top-p function for top-p).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .lab import kept_min_p, kept_top_p
from .metrics import distinct_n, statement_is_valid

#: Statement-level prompts: each completion is judged on the logical line it continues.
PROMPTS = [
    "import os\n\n\ndef list_python_files(root):\n    result = ",
    "def parse_header(line):\n    name, _, value = line.partition(':')\n    return ",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n        ",
    "import json\n\n\ndef load(path):\n    with open(path) as f:\n        ",
    "def count_words(text):\n    counts = {}\n    for word in ",
    "import re\n\nPATTERN = ",
    "def is_even(n):\n    if ",
    "class Config:\n    def get(self, key, default=None):\n        ",
    "import sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = ",
    "def read_lines(path):\n    with open(path, encoding='utf-8') as f:\n        return ",
    "def flatten(items):\n    out = []\n    for item in items:\n        if isinstance(",
    "import logging\n\nlogger = ",
]


def _kept_top_h(logits, alpha: float):
    import torch

    from .kernels.top_h import top_h

    return torch.isfinite(top_h(logits.clone(), alpha)).sum(-1)


@dataclass(frozen=True)
class DemoSampler:
    label: str
    vllm_args: dict                 # SamplingParams keyword arguments besides temperature
    kept: Callable                  # (scaled logits [steps, V]) -> tokens kept per step, by the same rule


SAMPLERS = [
    DemoSampler("vLLM top-p 0.9", {"top_p": 0.9}, lambda x: kept_top_p(x, 0.9)),
    DemoSampler("vLLM min-p 0.1", {"min_p": 0.1}, lambda x: kept_min_p(x, 0.1)),
    DemoSampler("llmgraft top-h 0.4", {"extra_args": {"top_h": 0.4}}, lambda x: _kept_top_h(x, 0.4)),
]


def run_demo(model: str | Path | None = None, samples: int = 8, max_tokens: int = 48,
             temperatures: tuple[float, ...] = (1.0, 1.5), plot: str | Path | None = None,
             seed: int = 0) -> list[dict]:
    """Generate, score and print; returns one result dict per (temperature, sampler)."""
    from .testing.engine import completion_logits, cpu_engine, set_cpu_engine_env
    from .testing.models import code_lm_path

    model = Path(model) if model else code_lm_path()
    set_cpu_engine_env(Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-demo")

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from .report import bar_plot, format_table

    t0 = time.perf_counter()
    engine = cpu_engine(model, seed=seed, max_num_seqs=64)
    hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: {model.name}, "
          f"{len(PROMPTS)} prompts x {samples} samples x {max_tokens} tokens")

    results = []
    jobs = [(t, s) for t in temperatures for s in SAMPLERS]
    for temperature, sampler in tqdm(jobs, desc="sampling", unit="config"):
        params = SamplingParams(n=samples, temperature=temperature, max_tokens=max_tokens, seed=seed,
                                **sampler.vllm_args)
        start = time.perf_counter()
        outputs = engine.generate(PROMPTS, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        completions = [(prompt, c) for prompt, o in zip(PROMPTS, outputs) for c in o.outputs]
        tokens = sum(len(c.token_ids) for _, c in completions)
        results.append({
            "temperature": temperature,
            "sampler": sampler.label,
            "mean_kept": float(sampler.kept(torch.cat([logits for o in outputs for logits, _ in
                                                       completion_logits(hf_model, o)]) / temperature).float().mean()),
            "distinct_2": distinct_n([list(c.token_ids) for _, c in completions], 2),
            "syntax_valid": sum(statement_is_valid(p, c.text) for p, c in completions) / len(completions),
            "tokens_per_s": tokens / seconds,
        })

    print()
    print(format_table(
        ["T", "sampler", "mean kept tokens", "distinct-2", "valid Python %", "tok/s"],
        [[f"{r['temperature']:.1f}", r["sampler"], r["mean_kept"], r["distinct_2"], 100 * r["syntax_valid"],
          r["tokens_per_s"]] for r in results],
        title="Sampling the bundled code LM (statement-level completions, higher valid % = more coherent)"))
    if plot:
        labels = [f"{r['sampler']} T={r['temperature']}" for r in results]
        path = bar_plot(plot, labels, {
            "mean kept tokens": [r["mean_kept"] for r in results],
            "distinct-2": [r["distinct_2"] for r in results],
            "valid Python %": [100 * r["syntax_valid"] for r in results],
        }, title="llmgraft demo: samplers on the bundled code LM", log_scale=["mean kept tokens"])
        print(f"plot written to {path}")
    return results
