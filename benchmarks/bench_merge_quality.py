"""Merge quality on the bundled code LM: the merging demo at a larger budget, written as markdown.

    python benchmarks/bench_merge_quality.py [--steps 48] [--tasks json html urllib xmlrpc] [--out PREFIX]

Fine-tunes the code LM on held-out standard-library packages (HF Trainer, full fine-tunes), then:
MWA over the checkpoints of one run (loss- and step-weighted) against their uniform average and the last
checkpoint (the paper's claim: loss-weighted beats uniform); task arithmetic, TIES and Consensus merges of
all tasks against each task's own fine-tune; and TALL: each task rebuilt from the store (λ chosen per task
on validation) against its fine-tune (the paper: >= 99% of the quality retained), with the store's size.
Losses are on each task's test split.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--tasks", nargs="+", default=["json", "html", "urllib", "xmlrpc"])
    parser.add_argument("--scratch", default=".scratch/bench-merge-quality")
    parser.add_argument("--out", help="write <out>.md")
    args = parser.parse_args()

    from llmgraft.demo_merge import run_merge_demo

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        run_merge_demo(scratch=args.scratch, steps=args.steps, tasks=tuple(args.tasks))
    text = captured.getvalue()
    print(text)
    if args.out:
        out = Path(args.out).with_suffix(".md")
        out.parent.mkdir(parents=True, exist_ok=True)
        title = (f"# Merge quality on the bundled code LM ({len(args.tasks)} tasks: {', '.join(args.tasks)}; "
                 f"{args.steps} fine-tuning steps each)\n\n")
        out.write_text(title + "```text\n" + text.strip() + "\n```\n")
        print(f"written: {out}")


if __name__ == "__main__":
    main()
