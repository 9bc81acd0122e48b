"""Merging LoRA adapters: llmgraft's ``merge_adapters`` against PEFT's own ``add_weighted_adapter``, side by side.

    python benchmarks/bench_adapter_merge.py [--adapters 2 4 8] [--rank 16] [--repeats 3] [--out PREFIX]

A random Llama (hidden 1024, 4 layers, all seven linear projections adapted) with N random LoRA adapters.
Two merges each way, timed (median of ``--repeats``) and checked for equal deltas:

* exact: task arithmetic with weights, at concatenated rank (PEFT: ``combination_type="cat"``);
* rank-r: the truncated SVD of the merged delta (PEFT: ``combination_type="svd"`` at ``density=1``, i.e.
  the same uniform-weight sum factorised), with llmgraft's reported relative error beside it.
"""

from __future__ import annotations

import argparse
import statistics
import time

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write <out>.md")
    args = parser.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmgraft.integrations.peft import merge_adapters
    from llmgraft.report import report_results

    from llmgraft.hooks import get_registry

    get_registry()  # load the plugins once, outside the timings
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=args.hidden, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=8, intermediate_size=int(args.hidden * 2.75))
    rows = []
    for count in args.adapters:
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=args.rank, target_modules=TARGETS,
                                                                    init_lora_weights=False), adapter_name="t0")
        names = [f"t{i}" for i in range(count)]
        for name in names[1:]:
            model.add_adapter(name, LoraConfig(r=args.rank, target_modules=TARGETS, init_lora_weights=False))
        weights = [1.0 / count] * count

        def deltas(adapter):
            return {n: m.scaling[adapter] * (m.lora_B[adapter].weight @ m.lora_A[adapter].weight)
                    for n, m in model.named_modules() if isinstance(m, LoraLayer) and adapter in m.lora_A}

        def timed(fn):
            samples = []
            for r in range(args.repeats):
                start = time.perf_counter()
                fn(r)
                samples.append(time.perf_counter() - start)
            return statistics.median(samples)

        ours_cat = timed(lambda r: merge_adapters(model, names, "task_arithmetic", f"ours_cat{r}",
                                                  per_input=[{"weight": w} for w in weights]))
        peft_cat = timed(lambda r: model.add_weighted_adapter(names, weights, f"peft_cat{r}", combination_type="cat"))
        report = {}

        def ours_svd(r):
            report.update(merge_adapters(model, names, "task_arithmetic", f"ours_svd{r}", rank=args.rank,
                                         per_input=[{"weight": w} for w in weights]))

        ours_r = timed(ours_svd)
        peft_r = timed(lambda r: model.add_weighted_adapter(names, weights, f"peft_svd{r}", combination_type="svd",
                                                            svd_rank=args.rank))
        with torch.no_grad():
            a, b = deltas("ours_cat0"), deltas("peft_cat0")
            same = max(float((a[k] - b[k]).abs().max()) for k in a)
            c, d = deltas("ours_svd0"), deltas("peft_svd0")
            svd_gap = max(float((c[k] - d[k]).norm() / d[k].norm()) for k in c)
        rows.append([count, ours_cat * 1e3, peft_cat * 1e3, peft_cat / ours_cat, f"{same:.1e}",
                     ours_r * 1e3, peft_r * 1e3, peft_r / ours_r, f"{report['relative_error']:.3f}", f"{svd_gap:.1e}"])
        print(f"N={count} done", flush=True)
    headers = ["N", "ours cat ms", "PEFT cat ms", "PEFT/ours", "max |Δ| difference", f"ours SVD r={args.rank} ms",
               "PEFT svd ms", "PEFT/ours", "our reported error", "delta gap to PEFT's svd"]
    title = (f"LoRA adapter merges (r={args.rank}, 7 projections x 4 layers, hidden {args.hidden}), median of "
             f"{args.repeats}; ratios > 1: llmgraft is faster")
    report_results(args.out, title, headers, rows)


if __name__ == "__main__":
    main()
