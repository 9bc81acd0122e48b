"""PromptDistill: prefill time and KV memory against the full model and the ideal; next-token quality
against GemFilter and a last-k window.

    python benchmarks/bench_prompt_distill.py [--lengths 1024 2048 4096] [--repeats 5] [--out PREFIX]

**Speed** (transformers, sdpa, float32, batch 1, this machine's CPU): a random Llama with hidden size 512,
12 layers, 8 query heads and 2 KV heads (head_dim 64), MLP 1536, vocabulary 4096. PromptDistill keeps 25%
of the prompt after layer index 3 (the first 4 layers, N/3, see the whole prompt). Side by side in one run,
interleaved, median of ``--repeats``: the full model; PromptDistill through ``llmgraft.prompt_distill``;
and the ideal, the same model's first 4 layers at full length then the last 8 on a fixed 25% of the tokens,
hand-wired with no scoring or hooks. Targets: at 4k, PromptDistill's speed-up over the full model is at
least 0.92x the ideal's, and the KV of the layers after the selection is at least 3.5x smaller.

**Quality** (the bundled code LM, 4 layers): the KL of the next-token distribution from the full model's,
and top-1 agreement, on held-out stdlib prompts of 1000 tokens, for PromptDistill (selection after layer
1), GemFilter (filter layer 1, rerun on the kept tokens) and the last-k window, at keep ratios 10/25/50%.

**vLLM** (the code LM, in-process engine): requests/s of 1000-token prompts, full model against the
llmgraft model class with PromptDistill, prefill only and with generation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

SPLIT, KEEP = 4, 0.25


def bench_model():
    import torch
    from transformers import AutoModelForCausalLM

    from llmgraft.testing.models import llama_config

    config = llama_config(4096, hidden=512, layers=12, heads=8, kv_heads=2, intermediate=1536, max_positions=8192)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32).eval()


def ideal_prefill(model, ids):
    """The first SPLIT layers on every token, the rest on a fixed KEEP of them: no scoring, no hooks."""
    import torch
    from transformers import DynamicCache

    base = model.model
    length = ids.shape[1]
    cache = DynamicCache(config=model.config)
    hidden = base.embed_tokens(ids)
    positions = torch.arange(length)[None]
    cos, sin = base.rotary_emb(hidden, positions)
    for layer in base.layers[:SPLIT]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions,
                       past_key_values=cache, use_cache=True)
    keep = torch.linspace(0, length - 1, math.ceil(KEEP * length)).round().long()
    hidden, cos, sin, positions = hidden[:, keep], cos[:, keep], sin[:, keep], positions[:, keep]
    for layer in base.layers[SPLIT:]:
        hidden = layer(hidden, attention_mask=None, position_embeddings=(cos, sin), position_ids=positions,
                       past_key_values=cache, use_cache=True)
    return model.lm_head(base.norm(hidden[:, -1:])), cache


def speed(lengths, repeats):
    import torch

    from llmgraft import prompt_distill
    from llmgraft.testing.retention_eval import cache_bytes, median_seconds

    model = bench_model()
    results = []
    for length in lengths:
        ids = torch.randint(1, 4096, (1, length), generator=torch.Generator().manual_seed(length))
        outputs = {}

        def full():
            outputs["full"] = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

        def distill():
            with prompt_distill(model, stages=[(SPLIT - 1, KEEP)]):
                outputs["distill"] = model(input_ids=ids, use_cache=True, logits_to_keep=1).past_key_values

        def ideal():
            outputs["ideal"] = ideal_prefill(model, ids)[1]

        with torch.no_grad():
            times = median_seconds({"full": full, "distill": distill, "ideal": ideal}, repeats)
        kv = {name: cache_bytes(cache) for name, cache in outputs.items()}
        seconds = {name: statistics.median(t) for name, t in times.items()}
        results.append({"length": length, "seconds": seconds, "all_seconds": times,
                        "kv_bytes": {n: sum(v) for n, v in kv.items()},
                        "later_kv_bytes": {n: sum(v[SPLIT:]) for n, v in kv.items()}})
    return results


def quality(count, ratios, layer=1):
    import torch
    from transformers import AutoModelForCausalLM

    from llmgraft.testing.models import code_lm_path
    from llmgraft.testing.retention_eval import heldout_prompts, kl_and_agreement

    model = AutoModelForCausalLM.from_pretrained(code_lm_path(), dtype=torch.float32).eval()
    prompts = heldout_prompts(1000, count)
    reference = next_token_logprobs(model, prompts)
    out = []
    from tqdm import tqdm

    for method in tqdm(("prompt_distill", "gemfilter", "last_k"), desc="quality", unit="method"):
        for ratio in ratios:
            kept: list = []
            logp = next_token_logprobs(model, prompts, retention={"stages": [(layer, ratio)], "method": method},
                                       kept=kept)
            kl, agree = kl_and_agreement(reference, logp)
            last = float(torch.cat([k[:, -1] == prompts.shape[1] - 1 for k in kept]).double().mean())
            out.append({"method": method, "keep": ratio, "kl": kl, "top1": agree, "last_kept": last,
                        "prompts": len(prompts)})
    return out


def vllm_throughput(requests: int, tokens: int, length: int = 1000, rounds: int = 3):
    """Requests/s of vLLM on the code LM, full and with PromptDistill (keep 25% after layer 1): prefill only
    (1 generated token) and with ``tokens`` generated; best of ``rounds``, one in-process engine each."""
    import gc
    import os
    import time

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from llmgraft.testing.engine import cpu_engine
    from llmgraft.testing.models import code_lm_path
    from llmgraft.testing.retention_eval import heldout_prompts

    prompts = [{"prompt_token_ids": p.tolist()} for p in heldout_prompts(length, requests)]
    runs = {"prefill": SamplingParams(temperature=0, max_tokens=1),
            f"{tokens} tokens": SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)}
    settings = {"hf_overrides": {"architectures": ["LlmgraftLlamaForCausalLM"]},
                "additional_config": {"llmgraft": {"prompt_distill": {"stages": [[1, 0.25]]}}}}
    out = {}
    for label, extra in (("full", {}), ("distill", settings)):
        llm = cpu_engine(code_lm_path(), max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=requests,
                         enable_chunked_prefill=False, enable_prefix_caching=False, **extra)
        llm.generate(prompts[:2], runs["prefill"], use_tqdm=False)
        for run, params in runs.items():
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                best = min(best, time.perf_counter() - start)
            out[(label, run)] = requests / best
        del llm
        gc.collect()
    return [{"run": run, "full": out[("full", run)], "distill": out[("distill", run)]} for run in runs]


def next_token_logprobs(model, prompts, batch: int = 8, retention: dict | None = None, kept: list | None = None):
    """Log-probabilities [N, V] (float64) of the token after each prompt, optionally under
    ``llmgraft.prompt_distill(model, **retention)``; ``kept`` collects each batch's first-stage indices."""
    import contextlib

    import torch

    from llmgraft import prompt_distill

    out = []
    for start in range(0, len(prompts), batch):
        ids = prompts[start:start + batch]
        block = prompt_distill(model, **retention) if retention else contextlib.nullcontext()
        with torch.no_grad(), block:
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=1).logits
        if kept is not None and retention and block.kept:
            kept.append(block.kept[0])
        out.append(torch.log_softmax(logits[:, -1].double(), -1))
    return torch.cat(out)


def plot(path, speed_rows, quality_rows):
    from llmgraft.report import line_panels

    lengths = [r["length"] for r in speed_rows]
    panels = {
        "prefill time (s), random Llama 512x12": {name: (lengths, [r["seconds"][name] for r in speed_rows])
                                                  for name in ("full", "distill", "ideal")},
        "next-token KL to the full model, code LM": {
            method: ([q["keep"] for q in quality_rows if q["method"] == method],
                     [q["kl"] for q in quality_rows if q["method"] == method])
            for method in ("prompt_distill", "gemfilter", "last_k")},
    }
    return line_panels(path, panels, xlabels=["prompt tokens", "keep ratio"], title="PromptDistill")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts for the quality part")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.25, 0.5])
    parser.add_argument("--requests", type=int, default=16, help="vLLM: requests of 1000 prompt tokens")
    parser.add_argument("--tokens", type=int, default=64, help="vLLM: generated tokens per request")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM throughput")
    parser.add_argument("--out", help="write <out>.md, <out>.json and <out>.png")
    args = parser.parse_args()

    from llmgraft.report import format_table, report_results

    speed_rows = speed(args.lengths, args.repeats)
    quality_rows = quality(args.prompts, args.ratios)
    vllm_rows = [] if args.no_vllm else vllm_throughput(args.requests, args.tokens)
    headers = ["prompt", "full s", "PromptDistill s", "ideal s", "speed-up", "ideal speed-up", "of ideal",
               "later-layer KV smaller"]
    rows = []
    for r in speed_rows:
        s = r["seconds"]
        gain, ideal_gain = s["full"] / s["distill"], s["full"] / s["ideal"]
        kv = r["later_kv_bytes"]["full"] / r["later_kv_bytes"]["distill"]
        rows.append([r["length"], f"{s['full']:.3f}", f"{s['distill']:.3f}", f"{s['ideal']:.3f}", f"{gain:.2f}x",
                     f"{ideal_gain:.2f}x", f"{gain / ideal_gain:.2f}", f"{kv:.2f}x"])
    quality_table = format_table(
        ["method", "keep", "KL to full (nats)", "top-1 = full", "last token kept"],
        [[q["method"], f"{q['keep']:.0%}", f"{q['kl']:.3f}", f"{q['top1']:.0%}", f"{q['last_kept']:.0%}"]
         for q in quality_rows],
        title=f"Next-token quality on the code LM ({quality_rows[0]['prompts']} held-out prompts of 1000 tokens, "
              "selection at layer 1 of 4)")
    last = speed_rows[-1]
    gain = last["seconds"]["full"] / last["seconds"]["distill"]
    ideal_gain = last["seconds"]["full"] / last["seconds"]["ideal"]
    kv = last["later_kv_bytes"]["full"] / last["later_kv_bytes"]["distill"]
    verdict = (f"At {last['length']} tokens: speed-up {gain:.2f}x = {gain / ideal_gain:.2f} of the ideal's "
               f"{ideal_gain:.2f}x (target >= 0.92); later-layer KV {kv:.2f}x smaller (target >= 3.5).")
    by = {(q["method"], q["keep"]): q["kl"] for q in quality_rows}
    wins = [k for k in args.ratios if by[("prompt_distill", k)] < by[("gemfilter", k)]]
    claim = (f"PromptDistill has a lower KL than GemFilter at {len(wins)} of {len(args.ratios)} keep ratios "
             f"({', '.join(f'{k:.0%}' for k in wins) or 'none'}).")
    notes = "```\n" + quality_table + "\n```\n\n" + verdict + "\n\n" + claim
    if vllm_rows:
        notes += "\n\n```\n" + format_table(
            ["run", "full requests/s", "PromptDistill requests/s", "speed-up"],
            [[v["run"], f"{v['full']:.1f}", f"{v['distill']:.1f}", f"{v['distill'] / v['full']:.2f}x"]
             for v in vllm_rows],
            title=f"vLLM on the code LM: {args.requests} requests of 1000 tokens, keep 25% after layer 1 of 4, "
                  "best of 3") + "\n```"
    title = (f"PromptDistill prefill on a random Llama (hidden 512, 12 layers, 8/2 heads, MLP 1536), keep "
             f"{KEEP:.0%} after layer {SPLIT - 1}; median of {args.repeats}")
    md = report_results(args.out, title, headers, rows, notes=notes,
                        data={"speed": speed_rows, "quality": quality_rows, "vllm": vllm_rows})
    if md is not None:
        print(f"written: {plot(md.with_suffix('.png'), speed_rows, quality_rows)}")


if __name__ == "__main__":
    main()
