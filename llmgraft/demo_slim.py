"""``llmgraft demo slim-moe``: an MoE made from the bundled code LM by sparse upcycling (4 experts, top-2)
is slimmed to half its expert size by SlimMoE in two prune + distil stages, against pruning alone (no
distillation) and random pruning; prints parameters (total and active per token) and held-out loss."""

from __future__ import annotations

import os
import time
from pathlib import Path


def run_slim_demo(scratch: str | Path | None = None, tokens: int = 32768, seed: int = 0) -> list[list]:
    from tqdm import tqdm

    from .integrations.transformers.host import TransformersHost
    from .plugins.slim_moe import SlimMoE, SlimMoEParams, moe_parameters
    from .report import format_table
    from .testing.code_lm import encode_corpus
    from .testing.models import code_lm_path, load_tokenizer, upcycle_to_mixtral

    start = time.perf_counter()
    scratch = Path(scratch or Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-demo-slim") / f"t{tokens}-s{seed}"
    teacher = scratch / "teacher"
    if not (teacher / "config.json").is_file():
        upcycle_to_mixtral(code_lm_path(), teacher, seed=seed)
    host = TransformersHost()
    heldout = encode_corpus(load_tokenizer(), "heldout")
    windows = heldout[: (len(heldout) // 128) * 128].view(-1, 128)[:48]
    runs = [("pruned to 50%, no distillation", SlimMoEParams(stages=(0.5,), tokens=0, seed=seed)),
            ("random neurons to 50%, then distilled", SlimMoEParams(stages=(0.5,), tokens=tokens, seed=seed,
                                                                    importance="random")),
            ("SlimMoE 75% -> 50%, distilled", SlimMoEParams(stages=(0.75, 0.5), tokens=tokens, seed=seed))]
    counts = moe_parameters(teacher)
    rows = [["teacher (upcycled code LM)", counts["total"], counts["active"], host.evaluate(teacher, windows, 8)]]
    for label, params in tqdm(runs, desc="slimming", unit="run"):
        out = scratch / label.split(",")[0].replace(" ", "-").replace("%", "").replace(">", "")
        if not (out / "config.json").is_file():
            SlimMoE().run(teacher, out, params, host)
        counts = moe_parameters(out)
        rows.append([label, counts["total"], counts["active"], host.evaluate(out, windows, 8)])
    print(format_table(["model", "parameters", "active per token", "held-out loss"], rows,
                       title=f"SlimMoE on an upcycled code LM (Mixtral, 4 experts, top-2): experts slimmed to 50%, "
                             f"{tokens:,} distillation tokens"))
    print(f"({time.perf_counter() - start:.0f} s; cached in {scratch}; the full comparison is "
          "benchmarks/bench_slim_moe.py)")
    return rows
