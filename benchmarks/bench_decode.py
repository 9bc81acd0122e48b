"""End-to-end vLLM decode throughput on the bundled code LM: built-in top-p against llmgraft Top-H.

    python benchmarks/bench_decode.py [--requests 32] [--max-tokens 128] [--repeats 3]

One in-process engine serves every configuration; runs are interleaved (p, h, p, h, ...) so machine drift
hits both alike. Prints output tokens/s per configuration (median over repeats) and the Top-H / top-p
ratio. Target (issue #2): >= 0.95.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()

    from llmgraft.demo import PROMPTS
    from llmgraft.testing.engine import cpu_engine, set_cpu_engine_env

    set_cpu_engine_env(Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-bench")
    from vllm import SamplingParams

    from llmgraft.report import format_table
    from llmgraft.testing.models import code_lm_path

    model = args.model or str(code_lm_path())
    engine = cpu_engine(model, kv_cache_bytes=256 << 20, max_num_seqs=args.requests)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    configs = {
        "temperature only": {},
        "vLLM top-p 0.9": {"top_p": 0.9},
        "llmgraft top-h 0.4": {"extra_args": {"top_h": 0.4}},
    }
    rates: dict[str, list[float]] = {name: [] for name in configs}
    for repeat in range(args.repeats + 1):  # the first round warms up and is discarded
        for name, extra in configs.items():
            params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=i, **extra)
                      for i in range(args.requests)]
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            if repeat:
                rates[name].append(sum(len(o.outputs[0].token_ids) for o in outputs) / seconds)
        print(f"round {repeat} done", flush=True)

    median = {name: statistics.median(r) for name, r in rates.items()}
    base = median["vLLM top-p 0.9"]
    print()
    print(format_table(["sampler", "output tok/s (median)", "runs", "vs top-p"],
                       [[n, median[n], ", ".join(f"{r:.0f}" for r in rates[n]), median[n] / base] for n in configs],
                       title=f"vLLM decode, {args.requests} requests x {args.max_tokens} tokens, bundled code LM"))
    print(f"\nTop-H / top-p throughput ratio: {median['llmgraft top-h 0.4'] / base:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
