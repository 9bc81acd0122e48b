"""SlimMoE at small scale: staged against one-shot against random pruning, at equal distillation tokens.

    python benchmarks/bench_slim_moe.py [--teacher-steps 300] [--tokens 262144] [--out PREFIX]

The teacher is a Mixtral-style MoE (4 experts, top-2, 11.5M parameters) made from the bundled code LM by
sparse upcycling and then trained on the standard-library corpus for ``--teacher-steps`` steps, so its
experts differ. Its experts are slimmed to 50% and 25% of their intermediate size three ways, each with the
same total distillation budget: one-shot (prune once, distil), staged (75% → 50%, or 75% → 50% → 25%) and
random neurons (one-shot, the floor); and pruned alone (no distillation), by sensitivity and at random. Reported: held-out loss (the code LM's held-out split) against the
teacher's, total and active parameters, and vLLM decode tokens/s of each model (one engine each, best of 3
passes of 32 requests x 96 tokens).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

DECODE = """
import json, sys, time
from vllm import SamplingParams
from llmgraft.testing.engine import cpu_engine
llm = cpu_engine(sys.argv[1], max_model_len=512, max_num_seqs=32)
prompts = [{"prompt_token_ids": [5 + i, 17, 300, 42]} for i in range(32)]
params = SamplingParams(temperature=0, max_tokens=96, ignore_eos=True)
llm.generate(prompts[:4], params)
best = 0.0
for _ in range(3):
    start = time.perf_counter()
    out = llm.generate(prompts, params)
    best = max(best, sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start))
print("RESULT", json.dumps(best))
"""


def train_teacher(out: Path, steps: int, seed: int = 0) -> Path:
    """Upcycle the code LM into a 4-expert Mixtral and train it on the corpus's training split."""
    import torch
    from transformers import AutoModelForCausalLM

    from llmgraft.testing.code_lm import encode_corpus
    from llmgraft.testing.models import code_lm_path, load_tokenizer, save_model_dir, upcycle_to_mixtral

    if (out / "config.json").is_file():
        return out
    upcycled = upcycle_to_mixtral(code_lm_path(), out.with_name(out.name + "-upcycled"), seed=seed)
    model = AutoModelForCausalLM.from_pretrained(str(upcycled), dtype=torch.float32).train()
    stream = encode_corpus(load_tokenizer(), "train")
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.0)
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc="teacher", unit="step"):
        starts = torch.randint(0, len(stream) - 129, (16,), generator=gen).tolist()
        batch = torch.stack([stream[s:s + 128] for s in starts])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return save_model_dir(model.eval(), load_tokenizer(), out)


def decode_tokens_per_second(model: Path) -> float:
    env_python = [sys.executable, "-c", DECODE, str(model)]
    result = subprocess.run(env_python, capture_output=True, text=True, timeout=900,
                            env={**__import__("os").environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-3000:])
    return json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=262144, help="distillation tokens per slimmed model")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--work", default=".scratch/bench-slim-moe")
    parser.add_argument("--no-vllm", action="store_true", help="skip the decode throughput")
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args()

    from tqdm import tqdm

    from llmgraft.integrations.transformers.host import TransformersHost
    from llmgraft.plugins.slim_moe import SlimMoE, SlimMoEParams, moe_parameters
    from llmgraft.report import report_results
    from llmgraft.testing.code_lm import encode_corpus
    from llmgraft.testing.models import load_tokenizer

    work = Path(args.work) / f"teacher{args.teacher_steps}-tokens{args.tokens}"
    teacher = train_teacher(work / "teacher", args.teacher_steps)
    host = TransformersHost()
    heldout = encode_corpus(load_tokenizer(), "heldout")
    windows = heldout[: (len(heldout) // 128) * 128].view(-1, 128)[:128]
    schedules = {0.5: (0.75, 0.5), 0.25: (0.75, 0.5, 0.25)}
    runs = []
    for target in args.targets:
        staged = schedules.get(target, (min(0.75, 2 * target), target))
        runs += [(target, "random, no distillation", (target,), "random", 0),
                 (target, "sensitivity, no distillation", (target,), "sensitivity", 0),
                 (target, "random, one-shot", (target,), "random", args.tokens),
                 (target, "one-shot", (target,), "sensitivity", args.tokens),
                 (target, f"staged {' -> '.join(f'{s:g}' for s in staged)}", staged, "sensitivity", args.tokens)]
    results = [{"target": 1.0, "method": "teacher", "loss": host.evaluate(teacher, windows, 8),
                **moe_parameters(teacher), "path": str(teacher), "seconds": 0.0}]
    for target, label, stages, importance, tokens in tqdm(runs, desc="slimming", unit="run"):
        out = work / f"{target:g}-{re.sub(r'[^a-z0-9.]+', '-', label)}"
        start = time.perf_counter()
        if not (out / "config.json").is_file():
            SlimMoE().run(teacher, out, SlimMoEParams(stages=stages, tokens=tokens, importance=importance), host)
        results.append({"target": target, "method": label, "loss": host.evaluate(out, windows, 8),
                        **moe_parameters(out), "path": str(out), "seconds": time.perf_counter() - start})
    if not args.no_vllm:
        for result in tqdm(results, desc="vLLM decode", unit="model"):
            if result["method"] in ("teacher", "one-shot") or result["method"].startswith("staged"):
                result["decode_tok_s"] = decode_tokens_per_second(Path(result["path"]))
    teacher_loss = results[0]["loss"]
    headers = ["experts kept", "method", "held-out loss", "vs teacher", "parameters", "active per token",
               "vLLM decode tok/s"]
    rows = [[f"{r['target']:.0%}", r["method"], f"{r['loss']:.3f}", f"{r['loss'] - teacher_loss:+.3f}",
             f"{r['total'] / 1e6:.2f}M", f"{r['active'] / 1e6:.2f}M",
             f"{r['decode_tok_s']:,.0f}" if "decode_tok_s" in r else ""] for r in results]
    title = (f"SlimMoE on a 4-expert Mixtral teacher ({args.teacher_steps} training steps), "
             f"{args.tokens:,} distillation tokens per model")
    report_results(args.out, title, headers, rows, data=results)


if __name__ == "__main__":
    main()
