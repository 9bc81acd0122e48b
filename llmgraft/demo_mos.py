"""``llmgraft demo mos``: fine-tune the bundled code LM on a held-out standard-library package with LoRA and
with MoS of the same trainable-parameter count (and LoRA at MoS's rank), then print trainable parameters,
held-out test loss and time per step. MoS's pools cost what LoRA at rank r_v costs, while each layer gets
rank r from the shared shards (the paper's claim is LoRA-r quality at LoRA-r_v cost)."""

from __future__ import annotations

import time

#: (label, kind, settings): MoS at LoRA-rank-1 cost with rank 4 (r ≤ r_v·L with L = 4 layers), against LoRA.
DEMO_RUNS = (
    ("LoRA r=1", "lora", {"r": 1}),
    ("MoS r_v=1 (r=4, c=2)", "mos", {"r": 4, "r_v": 1, "r_p": 0, "c": 2}),
    ("LoRA r=4", "lora", {"r": 4}),
)


def adapter_config(kind: str, settings: dict, target_modules="all-linear"):
    """A LoRA or MoS config with alpha = 2r and no dropout, so the runs differ only in the method."""
    if kind == "lora":
        from peft import LoraConfig

        return LoraConfig(r=settings["r"], lora_alpha=2 * settings["r"], lora_dropout=0.0,
                          target_modules=target_modules)
    from .integrations.peft import MoSConfig

    return MoSConfig(**settings, alpha=2.0 * settings["r"], dropout=0.0, target_modules=target_modules)


def run_mos_demo(package: str = "html", steps: int = 150, seed: int = 0) -> list[list]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from .report import format_table
    from .testing.finetune import adapter_finetune, task_loss
    from .testing.models import code_lm_path

    start = time.perf_counter()
    rows = [["code LM (no adapter)", 0, task_loss(AutoModelForCausalLM.from_pretrained(str(code_lm_path())), package),
             float("nan")]]
    for label, kind, settings in tqdm(DEMO_RUNS, desc="fine-tunes", unit="run"):
        result = adapter_finetune(package, adapter_config(kind, settings), steps=steps, seed=seed)
        rows.append([label, result["trainable"], result["test_loss"], result["ms_per_step"]])
    print(format_table(["adapter", "trainable params", f"{package} test loss", "ms/step"], rows,
                       title=f"LoRA vs MoS on the code LM, {steps} steps on the held-out `{package}` package"))
    print(f"({time.perf_counter() - start:.0f} s; the full comparison is benchmarks/bench_mos.py)")
    return rows
