"""``llmgraft demo merge``: fine-tune the bundled code LM on three held-out standard-library packages (HF Trainer),
then merge with every built-in merger through the full-checkpoint driver and compare held-out losses, time
and peak memory. Fine-tunes are cached in a scratch directory, so a second run only merges.

* MWA: the checkpoints of one run (json), weighted by their logged loss, against their uniform average
  and the last checkpoint alone.
* Multi-task: the three task fine-tunes merged by uniform averaging, task arithmetic, TIES and Consensus,
  scored on each task; and a TALL store (each task's λ chosen on its validation split), from which each
  task's model is rebuilt. Losses are on the tasks' test splits.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


#: The merges of one run's checkpoints the demo (and the merge benchmarks) compare: (label, method, params).
CHECKPOINT_MERGES = (("MWA by loss, p=1", "mwa", {"metric": "loss", "penalty": 1.0}),
                     ("MWA by loss, p=4", "mwa", {"metric": "loss", "penalty": 4.0}),
                     ("MWA by step, p=1", "mwa", {"metric": "step", "penalty": 1.0}),
                     ("uniform average", "uniform", {}))
#: The merges of several tasks' fine-tunes.
TASK_MERGES = (("uniform", "uniform", {}), ("task arithmetic 0.5", "task_arithmetic", {"scale": 0.5}),
               ("TIES d=0.2", "ties", {"density": 0.2}), ("Consensus k=2 (TA 0.5)", "consensus", {"k": 2, "scale": 0.5}))


def run_checkpoints(run: Path) -> list[Path]:
    """A training run's ``checkpoint-<step>`` directories, in step order."""
    return sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def run_merge_demo(scratch: str | Path | None = None, steps: int = 16, tasks: tuple[str, ...] = ("json", "html", "urllib"),
                   seed: int = 0) -> dict:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .offline.merge import choose_tall_lams, rebuild_tall
    from .report import format_table
    from .testing.finetune import finetune, task_loss
    from .testing.measure import peak_rss_mb
    from .testing.models import code_lm_path

    scratch = Path(scratch or Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-demo-merge") / f"s{steps}-seed{seed}"
    base = code_lm_path()
    t0 = time.perf_counter()
    runs = {}
    for task in tqdm(tasks, desc="fine-tunes", unit="task"):
        out = scratch / f"ft-{task}"
        if not (out / "final" / "model.safetensors").exists():
            finetune(task, out, steps=steps, save_steps=steps // 4 if task == tasks[0] else None, seed=seed)
        runs[task] = out
    print(f"fine-tunes ready in {time.perf_counter() - t0:.1f} s (cached in {scratch})")

    losses: dict[str, float] = {}

    def score(path: Path, task_list=tasks, split: str = "test") -> list[float]:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
        return [task_loss(model, t, split) for t in task_list]

    cli = [sys.executable, "-m", "llmgraft.cli"]
    floor, _ = peak_rss_mb([sys.executable, "-c", "import llmgraft.offline.merge"])

    def run_merge(argv: list[str]) -> tuple[float, float]:
        """Seconds and peak MB above python + llmgraft of one CLI merge, in its own process."""
        peak, seconds = peak_rss_mb([*cli, *argv, "--force"])
        return seconds, peak - floor

    # MWA over the checkpoints of the first task's run.
    checkpoints = run_checkpoints(runs[tasks[0]])
    mwa_rows = []
    for label, method, params in CHECKPOINT_MERGES:
        out = scratch / f"mwa-{method}-{'-'.join(f'{k}{v}' for k, v in params.items())}"
        seconds, memory = run_merge(["merge", "--method", method, *map(str, checkpoints), "--out", str(out),
                                     *[f"--set={k}={json.dumps(v)}" for k, v in params.items()]])
        mwa_rows.append([label, score(out, (tasks[0],))[0], seconds, memory])
    mwa_rows.append([f"last checkpoint ({checkpoints[-1].name})", score(checkpoints[-1], (tasks[0],))[0], "-", "-"])
    mwa_rows.append(["base code LM", score(base, (tasks[0],))[0], "-", "-"])
    print()
    print(format_table(["merge", f"{tasks[0]} loss", "seconds", "peak MB"], mwa_rows,
                       title=f"MWA over {len(checkpoints)} checkpoints of one {tasks[0]} run (test loss, lower is "
                             "better; peak MB as below)"))

    # Multi-task merges of the task fine-tunes.
    finals = [runs[t] / "final" for t in tasks]
    rows = [["base code LM", *score(base), "-", "-"]]
    individual = [score(p)[i] for i, p in enumerate(finals)]
    rows.append(["each task's own fine-tune", *individual, "-", "-"])
    for label, method, params in TASK_MERGES:
        out = scratch / f"multi-{method}"
        seconds, memory = run_merge(["merge", "--method", method, "--base", str(base), *map(str, finals), "--out",
                                     str(out), *[f"--set={k}={json.dumps(v)}" for k, v in params.items()]])
        rows.append([label, *score(out), seconds, memory])
    lams, _ = choose_tall_lams(base, finals, lambda t, path: score(path, (tasks[t],), "val")[0], progress=False)
    seconds, memory = run_merge(["tall", "build", "--base", str(base), *map(str, finals), "--out",
                                 str(scratch / "tall"), "--lams", *map(str, lams)])
    manifest = json.loads((scratch / "tall" / "tall.json").read_text())
    rebuilt = []
    for t in range(len(tasks)):
        rebuild_tall(scratch / "tall", t, scratch / f"tall-{t}", force=True, progress=False)
        rebuilt.append(score(scratch / f"tall-{t}", (tasks[t],))[0])
    rows.append([f"TALL (lambda {', '.join(f'{v:g}' for v in lams)} on val), task t rebuilt", *rebuilt, seconds,
                 memory])
    print()
    print(format_table(["merge", *[f"{t} loss" for t in tasks], "seconds", "peak MB"], rows,
                       title=f"{len(tasks)} task fine-tunes merged into one model (test loss per task, lower is "
                             "better; peak MB: the merge's peak resident memory above python + llmgraft, "
                             "each merge in its own process)"))
    store = sum(f.stat().st_size for f in (scratch / "tall").glob("*.safetensors"))
    inputs = sum(f.stat().st_size for p in finals for f in p.glob("*.safetensors"))
    print(f"\nTALL store: {store / 2**20:.1f} MB for {inputs / 2**20:.1f} MB of fine-tunes "
          f"(mask density {', '.join(f'{100 * k:.0f}%' for k in manifest['kept_fraction'])})")
    losses.update({"mwa": mwa_rows, "multi": rows})
    return losses
