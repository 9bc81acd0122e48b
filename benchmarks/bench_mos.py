"""MoS against LoRA at equal trainable-parameter budgets, fine-tuning the bundled code LM on a held-out package.

    python benchmarks/bench_mos.py [--package html] [--steps 300] [--seeds 2] [--out PREFIX]

LoRA at ranks 1, 2, 4 and 8 against MoS configurations whose pools cost what LoRA at rank r_v costs
(L·r_v·(d_in + d_out) per module type), on all seven projections, alpha = 2r, no dropout, AdamW at a
constant learning rate. Each run is its own process, so its peak resident memory is its own; the test loss
is averaged over seeds. The code LM has only 4 layers, so MoS's rank is at most 4·r_v (r - r_p ≤ (r_v - r_p)·L):
the paper's 8× savings need more layers to share across than this model has.
"""

from __future__ import annotations

import argparse
import json
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
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="LoRA r=1 and MoS r_v=1 only")
    parser.add_argument("--out", help="write <out>.md and <out>.png")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(json.loads(args.one))
        return

    from tqdm import tqdm

    from llmgraft.report import format_table, frontier_plot, markdown_table
    from llmgraft.testing.measure import run_with_peak_rss

    configs = QUICK if args.quick else LORA + MOS
    rows, curves = [], {"LoRA": [], "MoS": []}
    runs = [(m, s, seed) for m, s in configs for seed in range(args.seeds)]
    results: dict[tuple, list[dict]] = {}
    for method, settings, seed in tqdm(runs, desc="fine-tunes", unit="run"):
        spec = {"method": method, "settings": settings, "package": args.package, "steps": args.steps, "seed": seed}
        stdout, peak, _ = run_with_peak_rss([sys.executable, __file__, "--one", json.dumps(spec)])
        result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
        results.setdefault((method, json.dumps(settings)), []).append({**result, "peak_mb": peak})
    lora_losses = {}
    for (method, settings), found in results.items():
        settings = json.loads(settings)
        loss = statistics.mean(r["test_loss"] for r in found)
        label = ", ".join(f"{k}={v}" for k, v in settings.items())
        matches = ""
        if method == "LoRA":
            lora_losses[settings["r"]] = loss
        else:  # the largest LoRA rank (run first) it matches or beats, and the parameter saving that implies
            best = max((r for r, lora in lora_losses.items() if loss <= lora), default=None)
            matches = f"LoRA r={best} ({best / settings['r_v']:g}x its params)" if best else "worse than LoRA r=1"
        rows.append([method, label, found[0]["trainable"], loss, statistics.median(r["ms_per_step"] for r in found),
                     max(r["peak_mb"] for r in found), matches])
        curves[method].append((found[0]["trainable"] / 1000, loss, label))
    headers = ["method", "config", "trainable params", f"{args.package} test loss", "ms/step", "peak RSS MB",
               "matches"]
    title = (f"MoS vs LoRA on the code LM: {args.steps} steps on `{args.package}`, loss mean of {args.seeds} "
             "seed(s), all seven projections")
    print()
    print(format_table(headers, rows, title=title))
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(f"# {title}\n\n{markdown_table(headers, rows)}\n")
        frontier_plot(out.with_suffix(".png"), {k: sorted(v) for k, v in curves.items() if v}, title,
                      "trainable parameters (thousands)", f"{args.package} test loss (lower is better)")
        print(f"written: {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
