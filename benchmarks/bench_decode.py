"""End-to-end vLLM decode throughput on the bundled code LM: plain temperature sampling, vLLM's top-p, and
llmgraft's Top-H, on one in-process engine, with a breakdown of where Top-H's cost goes.

    python benchmarks/bench_decode.py [--requests 32] [--max-tokens 128] [--repeats 5] [--out PREFIX]

Rounds are interleaved (every configuration once per round, in a rotating order) so machine drift hits
all alike; the first round warms up and is discarded. Reported: output tokens/s per configuration
(median, min-max over rounds) and, per round, the throughput ratio to temperature-only sampling (median,
min-max). Target (issue #6): Top-H >= 0.95x temperature only.

The breakdown times, in the same process, one decode step's worth of each piece at the engine's shape
[requests, vocab]: the whole Top-H kernel, its ``torch.topk``, and the rest of the processor's work.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def per_call_ms(fn, make_input, repeats: int = 200) -> float:
    fn(make_input())
    samples = []
    for _ in range(repeats):
        x = make_input()
        start = time.perf_counter()
        fn(x)
        samples.append(time.perf_counter() - start)
    return 1e3 * statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default=None)
    parser.add_argument("--out", help="also write <out>.md")
    args = parser.parse_args()

    from llmgraft.demo import PROMPTS
    from llmgraft.testing.engine import cpu_engine, set_cpu_engine_env

    set_cpu_engine_env(Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-bench")
    import torch
    from vllm import SamplingParams

    from llmgraft.kernels.top_h import top_h
    from llmgraft.report import format_table, markdown_table
    from llmgraft.testing.models import code_lm_path

    model = args.model or str(code_lm_path())
    engine = cpu_engine(model, kv_cache_bytes=256 << 20, max_num_seqs=args.requests)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    configs = {
        "temperature only": {},
        "vLLM top-p 0.9": {"top_p": 0.9},
        "llmgraft top-h 0.4": {"extra_args": {"top_h": 0.4}},
    }
    names = list(configs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    steps = 0
    for repeat in range(args.repeats + 1):  # round 0 warms up and is discarded
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            params = [SamplingParams(temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=i,
                                     **configs[name]) for i in range(args.requests)]
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            steps = tokens // args.requests
            if repeat:
                rates[name].append(tokens / seconds)
        print(f"round {repeat} done", flush=True)

    base = rates["temperature only"]
    rows = []
    for name in names:
        ratios = sorted(r / b for r, b in zip(rates[name], base))
        rows.append([name, statistics.median(rates[name]), f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}",
                     f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})"])
    headers = ["sampler", "output tok/s (median)", "min-max", "vs temperature only: median (min-max)"]
    title = (f"vLLM decode, {args.requests} requests x {args.max_tokens} tokens, bundled code LM, "
             f"{args.repeats} interleaved rounds")
    print()
    print(format_table(headers, rows, title=title))

    # Where the rest goes: one step's worth of each piece at the engine's own shape.
    vocab = engine.llm_engine.model_config.get_vocab_size()
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(args.requests, vocab, generator=gen) * 3

    def fresh():
        return logits.clone()

    step_ms = 1e3 * args.requests / statistics.median(base)
    kernel_ms = per_call_ms(lambda x: top_h(x, 0.4), fresh)
    topk_ms = per_call_ms(lambda x: torch.topk(x, 100), fresh)
    top_h_rate = statistics.median(rates["llmgraft top-h 0.4"])
    extra_ms = 1e3 * args.requests / top_h_rate - step_ms
    breakdown = [["decode step, temperature only", step_ms],
                 ["decode step with Top-H: extra time", extra_ms],
                 [f"Top-H kernel at [{args.requests}, {vocab}]", kernel_ms],
                 ["  of which torch.topk(100)", topk_ms],
                 ["  of which the rest of the kernel", kernel_ms - topk_ms],
                 ["extra time minus the kernel (routing; vLLM samples faster from masked rows)",
                  extra_ms - kernel_ms]]
    print()
    print(format_table(["per decode step", "ms"], breakdown, title="Where Top-H's time goes"))
    ratio = statistics.median(sorted(r / b for r, b in zip(rates["llmgraft top-h 0.4"], base)))
    verdict = f"Top-H / temperature-only throughput: {ratio:.3f} (target >= 0.95)"
    print(f"\n{verdict}")
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n{markdown_table(headers, rows)}\n\n## Where Top-H's time goes "
                       f"({steps} steps per request)\n\n{markdown_table(['per decode step', 'ms'], breakdown)}"
                       f"\n\n{verdict}\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
