"""Merge quality of LoRA adapters on the bundled code LM: the adapter path of the merge-quality benchmark.

    python benchmarks/bench_adapter_merge_quality.py [--steps 160] [--rank 8]
                                                     [--tasks json html urllib xmlrpc] [--out PREFIX]

Trains one LoRA adapter (all seven projections) per held-out standard-library package, saving the first
task's run every quarter with its validation loss in ``trainer_state.json``. Then, as
``bench_merge_quality.py`` does for full fine-tunes:

* MWA over the first run's checkpoints (``merge_adapter_dirs``: exact, at concatenated rank), by loss and by
  step, against their uniform average and the last checkpoint (the paper's claim: loss-weighted beats
  uniform);
* the task adapters merged: uniform and task arithmetic as exact adapters (``merge_adapters``), TIES and
  Consensus as full-rank deltas written into a full model (``merge_adapters_into_base``), against each
  task's own adapter and the base model.

Losses are on each task's test split. Trained adapters are cached in ``--scratch``.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tasks", nargs="+", default=["json", "html", "urllib", "xmlrpc"])
    parser.add_argument("--scratch", default=".scratch/bench-adapter-merge-quality")
    parser.add_argument("--out", help="write <out>.md")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, PeftModel
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from llmgraft.demo_merge import CHECKPOINT_MERGES, TASK_MERGES, run_checkpoints
    from llmgraft.hooks import get_registry
    from llmgraft.integrations.peft import merge_adapter_dirs, merge_adapters, merge_adapters_into_base
    from llmgraft.report import report_results
    from llmgraft.testing.finetune import adapter_finetune, task_loss
    from llmgraft.testing.models import code_lm_path

    scratch = Path(args.scratch) / f"r{args.rank}-s{args.steps}"
    tasks = list(args.tasks)
    start = time.perf_counter()
    runs = {}
    for i, task in enumerate(tqdm(tasks, desc="LoRA fine-tunes", unit="task")):
        out = scratch / f"lora-{task}"
        if not (out / "adapter_model.safetensors").exists():
            shutil.rmtree(out, ignore_errors=True)
            config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)
            adapter_finetune(task, config, steps=args.steps, out=out,
                             save_every=max(1, args.steps // 4) if i == 0 else None)
        runs[task] = out
    print(f"adapters ready in {time.perf_counter() - start:.1f} s (cached in {scratch})")

    def base_model():
        return AutoModelForCausalLM.from_pretrained(str(code_lm_path()), dtype=torch.float32)

    def adapter_losses(path: Path, task_list) -> list[float]:
        model = PeftModel.from_pretrained(base_model(), str(path)).eval()
        return [task_loss(model, t) for t in task_list]

    # MWA over the checkpoints of the first task's run.
    first = tasks[0]
    checkpoints = run_checkpoints(runs[first])
    headers = ["merge", *[f"{t} loss" for t in tasks], "rank"]
    rows = []
    for label, method, params in CHECKPOINT_MERGES:
        out = scratch / f"mwa-{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
        report = merge_adapter_dirs(checkpoints, method, out, params=params, force=True)
        rows.append([f"{first} run: {label}", adapter_losses(out, [first])[0], *["-"] * (len(tasks) - 1),
                     report["rank"]])
    rows.append([f"{first} run: last checkpoint ({checkpoints[-1].name})", adapter_losses(checkpoints[-1], [first])[0],
                 *["-"] * (len(tasks) - 1), args.rank])

    # The task adapters merged into one.
    model = PeftModel.from_pretrained(base_model(), str(runs[tasks[0]]), adapter_name=tasks[0]).eval()
    for task in tasks[1:]:
        model.load_adapter(str(runs[task]), adapter_name=task)
    with model.disable_adapter():
        rows.append(["base code LM", *[task_loss(model, t) for t in tasks], "-"])
    own = []
    for task in tasks:
        model.set_adapter(task)
        own.append(task_loss(model, task))
    rows.append(["each task's own adapter", *own, args.rank])
    for label, method, params in TASK_MERGES:
        if get_registry().get("merger", method).linear:  # an exact adapter at concatenated rank
            report = merge_adapters(model, tasks, method, f"merged_{method}", params=params)
            model.set_adapter(f"merged_{method}")
            rows.append([f"{label} (exact adapter)", *[task_loss(model, t) for t in tasks], report["rank"]])
        else:  # masked methods: full-rank deltas, written into the base
            out = scratch / f"dense-{method}"
            merge_adapters_into_base(model, tasks, method, out, params=params, force=True)
            merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
            rows.append([f"{label} (full-rank, into the base)", *[task_loss(merged, t) for t in tasks], "full"])

    title = (f"LoRA adapters merged on the code LM ({len(tasks)} tasks: {', '.join(tasks)}; r={args.rank}, "
             f"{args.steps} steps each, all seven projections; test loss per task, lower is better)")
    mwa = {row[0]: row[1] for row in rows[:5]}
    by_loss, uniform = mwa[f"{first} run: MWA by loss, p=1"], mwa[f"{first} run: uniform average"]
    notes = (f"MWA claim (loss-weighted beats uniform) on {first}: loss-weighted p=1 {by_loss:.3f} vs uniform "
             f"{uniform:.3f}: {'holds' if by_loss < uniform else 'does not hold'} here.")
    report_results(args.out, title, headers, rows, notes=notes)


if __name__ == "__main__":
    main()
