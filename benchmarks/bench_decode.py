"""End-to-end vLLM decode throughput on the bundled code LM, one in-process engine: plain temperature
sampling, vLLM's top-p, and every llmgraft sampler (Top-H, Top-W, top-nσ, p-less), with Top-W also at
T = 0.7 and 1.5, and a breakdown of where the samplers' time goes.

    python benchmarks/bench_decode.py [--requests 32] [--max-tokens 128] [--repeats 5] [--out PREFIX]

Rounds are interleaved (every configuration once per round, in a rotating order) so machine drift hits
all alike; the first round warms up and is discarded. Reported: output tokens/s per configuration
(median, min-max over rounds) and, per round, the throughput ratio to temperature-only sampling at the same
temperature (median, min-max). Targets: Top-H >= 0.95x (issue #6), Top-W >= 0.5x at T=1.0, B=32 (issue #7).

For Top-W, the mean kept-set size |S| and the mean number of passes come from replaying the completions'
logits through transformers and the same kernel. The breakdown times, in the same process, each sampler's
kernel at the engine's shape [requests, vocab] on real logits of the model.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path


def per_call_ms(fn, make_input, repeats: int = 100) -> float:
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
    from llmgraft.testing.engine import completion_logits, cpu_engine, set_cpu_engine_env

    set_cpu_engine_env(Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-bench")
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from llmgraft.kernels import native
    from llmgraft.kernels.thresholds import p_less, top_nsigma
    from llmgraft.kernels.top_h import top_h
    from llmgraft.kernels.top_w import TopWStats, top_w, unit_embeddings
    from llmgraft.report import format_table, markdown_table
    from llmgraft.testing.models import code_lm_path

    model = args.model or str(code_lm_path())
    engine = cpu_engine(model, kv_cache_bytes=256 << 20, max_num_seqs=args.requests)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    configs = {  # name: (temperature, SamplingParams keywords)
        "temperature only": (1.0, {}),
        "vLLM top-p 0.9": (1.0, {"top_p": 0.9}),
        "llmgraft top-h 0.4": (1.0, {"extra_args": {"top_h": 0.4}}),
        "llmgraft top-w": (1.0, {"extra_args": {"llmgraft_sampler": "top_w"}}),
        "llmgraft top-nsigma 1.0": (1.0, {"extra_args": {"top_nsigma": 1.0}}),
        "llmgraft p-less": (1.0, {"extra_args": {"llmgraft_sampler": "p_less"}}),
        "temperature only T=0.7": (0.7, {}),
        "llmgraft top-w T=0.7": (0.7, {"extra_args": {"llmgraft_sampler": "top_w"}}),
        "temperature only T=1.5": (1.5, {}),
        "llmgraft top-w T=1.5": (1.5, {"extra_args": {"llmgraft_sampler": "top_w"}}),
    }
    names = list(configs)
    rates: dict[str, list[float]] = {name: [] for name in names}
    last: dict[str, list] = {}
    steps = 0
    for repeat in range(args.repeats + 1):  # round 0 warms up and is discarded
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            temperature, extra = configs[name]
            params = [SamplingParams(temperature=temperature, max_tokens=args.max_tokens, ignore_eos=True, seed=i,
                                     **extra) for i in range(args.requests)]
            start = time.perf_counter()
            outputs = engine.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            steps = tokens // args.requests
            if repeat:
                rates[name].append(tokens / seconds)
            last[name] = outputs
        print(f"round {repeat} done", flush=True)

    def baseline(name: str) -> str:
        t = configs[name][0]
        return "temperature only" if t == 1.0 else f"temperature only T={t}"

    hf_model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    unit = unit_embeddings(hf_model.get_input_embeddings().weight.detach())
    rows, ratio_of = [], {}
    for name in names:
        base = rates[baseline(name)]
        ratios = sorted(r / b for r, b in zip(rates[name], base))
        ratio_of[name] = statistics.median(ratios)
        kept = passes = "-"
        if "top-w" in name:  # replay 8 completions through the same kernel for |S| and passes
            stats = TopWStats()
            logits = torch.cat([l for o in last[name][:8] for l, _ in completion_logits(hf_model, o)])
            top_w(logits / configs[name][0], unit, stats=stats)
            kept, passes = float(stats.kept.float().mean()), float(stats.passes.float().mean())
        rows.append([name, statistics.median(rates[name]), f"{min(rates[name]):,.0f}-{max(rates[name]):,.0f}",
                     f"{ratio_of[name]:.3f} ({ratios[0]:.3f}-{ratios[-1]:.3f})", kept, passes])
    headers = ["sampler", "output tok/s (median)", "min-max", "vs temperature only, same T: median (min-max)",
               "Top-W mean |S|", "Top-W mean passes"]
    title = (f"vLLM decode, {args.requests} requests x {args.max_tokens} tokens, bundled code LM, "
             f"{args.repeats} interleaved rounds, T=1.0 unless named")
    print()
    print(format_table(headers, rows, title=title))

    # Where the time goes: one step's worth of each kernel at the engine's own shape, on real logits.
    real = torch.cat([l for o in last["temperature only"] for l, _ in completion_logits(hf_model, o)])
    logits = real[torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:args.requests]]
    step_ms = 1e3 * args.requests / statistics.median(rates["temperature only"])
    breakdown = [["decode step, temperature only", step_ms]]
    for name, kernel in (("llmgraft top-h 0.4", lambda x: top_h(x, 0.4)), ("llmgraft top-w", lambda x: top_w(x, unit)),
                         ("llmgraft top-nsigma 1.0", lambda x: top_nsigma(x, 1.0)),
                         ("llmgraft p-less", lambda x: p_less(x))):
        extra = 1e3 * args.requests / statistics.median(rates[name]) - step_ms
        breakdown += [[f"{name}: extra time per step", extra],
                      [f"  its kernel at [{args.requests}, {logits.shape[1]}]", per_call_ms(kernel, logits.clone)]]
    breakdown.append(["torch.topk(1200) at the same shape (Top-W's pool, torch path)",
                      per_call_ms(lambda x: torch.topk(x, 1200), logits.clone)])
    if native.top_n(logits, 1200, "mass") is not None:
        breakdown.append(["compiled top-1200 and tail mass, same shape (Top-W's pool, this run)",
                          per_call_ms(lambda x: native.top_n(x, 1200, "mass"), logits.clone)])
    print()
    print(format_table(["per decode step", "ms"], breakdown, title="Where the samplers' time goes"))
    verdict = (f"Top-H / temperature-only throughput: {ratio_of['llmgraft top-h 0.4']:.3f} (target >= 0.95); "
               f"Top-W at T=1.0: {ratio_of['llmgraft top-w']:.3f} (target >= 0.5)")
    print(f"\n{verdict}")
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n{markdown_table(headers, rows)}\n\n## Where the samplers' time goes "
                       f"({steps} steps per request)\n\n{markdown_table(['per decode step', 'ms'], breakdown)}"
                       f"\n\n{verdict}\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
