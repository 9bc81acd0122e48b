"""MoS against LoRA at equal trainable-parameter budgets, fine-tuning the bundled code LM on a held-out package.

    python benchmarks/bench_mos.py [--package html] [--steps 300] [--seeds 3] [--out PREFIX] [--report PREFIX.json]

LoRA at ranks 1, 2, 4 and 8 against MoS configurations whose pools cost what LoRA at rank r_v costs
(L·r_v·(d_in + d_out) per module type), on all seven projections, alpha = 2r, no dropout, AdamW at a
constant learning rate. Each run is its own process, so its peak resident memory is its own; the test loss
is averaged over seeds. The code LM has only 4 layers, so MoS's rank is at most 4·r_v (r - r_p ≤ (r_v - r_p)·L):
the paper's 8× savings need more layers to share across than this model has.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

LORA = [("LoRA", {"r": r}) for r in (1, 2, 4, 8)]
MOS = [("MoS", {"r": 4, "r_v": 1, "r_p": 0, "c": 2}), ("MoS", {"r": 8, "r_v": 2, "r_p": 0, "c": 2}),
       ("MoS", {"r": 5, "r_v": 2, "r_p": 1, "c": 2}), ("MoS", {"r": 16, "r_v": 4, "r_p": 0, "c": 2})]
QUICK = [LORA[0], MOS[0]]


def one(spec: dict) -> None:
    """Run one fine-tune (in this process) and print its result as JSON."""
    from llmgraft.demo_mos import adapter_config
    from llmgraft.testing.finetune import adapter_finetune

    kind = "lora" if spec["method"] == "LoRA" else "mos"
    result = adapter_finetune(spec["package"], adapter_config(kind, spec["settings"]), steps=spec["steps"],
                              seed=spec["seed"])
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="html", help="the held-out standard-library package (the task)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="LoRA r=1 and MoS r_v=1 only")
    parser.add_argument("--out", help="write <out>.md and <out>.png")
    parser.add_argument("--report", help="re-render the tables and plot from a results .json, running nothing")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one))
        return
    if args.report:
        results = json.loads(Path(args.report).read_text())
        args.package, args.steps = results[0]["package"], results[0]["steps"]
        report(results, args)
        return

    from llmgraft.testing.measure import run_with_peak_rss

    from tqdm import tqdm

    configs = QUICK if args.quick else LORA + MOS
    runs = [(m, s, seed) for m, s in configs for seed in range(args.seeds)]
    results = []
    for method, settings, seed in tqdm(runs, desc="fine-tunes", unit="run"):
        spec = {"method": method, "settings": settings, "package": args.package, "steps": args.steps, "seed": seed}
        stdout, peak, _ = run_with_peak_rss([sys.executable, __file__, "--one", json.dumps(spec)])
        result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
        results.append({**spec, **result, "peak_mb": peak})
    report(results, args)


def lora_equivalent_rank(loss: float, lora: dict[int, float]) -> float | None:
    """The LoRA rank that would reach ``loss``, interpolating LoRA's loss linearly in log2(rank) between the
    measured ranks (None outside their range)."""
    ranks = sorted(lora)
    for low, high in zip(ranks, ranks[1:]):
        if lora[high] <= loss <= lora[low] and lora[low] > lora[high]:
            t = (lora[low] - loss) / (lora[low] - lora[high])
            return 2 ** (math.log2(low) + t * (math.log2(high) - math.log2(low)))
    return None


def report(results: list[dict], args) -> None:
    from llmgraft.report import frontier_plot, report_results

    groups: dict[tuple, list[dict]] = {}
    for result in results:
        groups.setdefault((result["method"], json.dumps(result["settings"])), []).append(result)
    lora = {json.loads(s)["r"]: statistics.mean(r["test_loss"] for r in found)
            for (m, s), found in groups.items() if m == "LoRA"}
    lora_ms = {found[0]["trainable"]: statistics.median(r["ms_per_step"] for r in found)
               for (m, s), found in groups.items() if m == "LoRA"}
    rows, curves = [], {"LoRA": [], "MoS": []}
    for (method, settings), found in groups.items():
        settings = json.loads(settings)
        losses = [r["test_loss"] for r in found]
        loss, ms = statistics.mean(losses), statistics.median(r["ms_per_step"] for r in found)
        label = ", ".join(f"{k}={v}" for k, v in settings.items())
        equivalent, time_ratio = "", ""
        if method == "MoS":
            rank = lora_equivalent_rank(loss, lora)
            equivalent = (f"{rank:.1f} ({rank / settings['r_v']:.1f}x)" if rank else
                          f"better than LoRA r={max(lora)}" if loss < min(lora.values()) else "worse than LoRA r=1")
            same = lora_ms.get(found[0]["trainable"])
            time_ratio = f"{ms / same:.2f}" if same else ""
        rows.append([method, label, found[0]["trainable"], f"{loss:.3f}", f"{(max(losses) - min(losses)) / 2:.3f}",
                     equivalent, f"{ms:.0f}", time_ratio, f"{max(r['peak_mb'] for r in found):.0f}"])
        curves[method].append((found[0]["trainable"] / 1000, loss, label))
    seeds = len(next(iter(groups.values())))
    headers = ["method", "config", "trainable params", f"{args.package} test loss", "± (half range)",
               "LoRA-equivalent rank (params saved)", "ms/step", "time vs LoRA of equal params", "peak RSS MB"]
    title = (f"MoS vs LoRA on the code LM: {args.steps} steps on `{args.package}`, loss mean of {seeds} seed(s), "
             "all seven projections")
    out = report_results(args.out, title, headers, rows, data=results)
    if out is not None:
        plot = frontier_plot(out.with_suffix(".png"), {k: sorted(v) for k, v in curves.items() if v}, title,
                             "trainable parameters (thousands)", f"{args.package} test loss (lower is better)")
        print(f"written: {plot}")


if __name__ == "__main__":
    main()
