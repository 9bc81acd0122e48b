"""Top-H time per batch, side by side in one run with its baselines.

    python benchmarks/bench_top_h.py [--repeats 5] [--batches 1 16 64] [--vocabs 8192 32768 131072] [--plot f.png]

Columns (milliseconds per call, median of repeats, same logits for all):
* llmgraft top_h (reference / hf variant): the batched kernel;
* official loop: a torch port of the official per-row, per-token loop (batch 1 only upstream);
* HF TopHLogitsWarper: transformers' built-in warper;
* vLLM top-p: ``apply_top_k_top_p_pytorch`` (what vLLM runs for top_p on the CPU; sorts the full vocab).
Targets (issue #2): at B=64, V=32k, llmgraft is no slower than the HF warper nor vLLM's top-p.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def official_loop(logits: torch.Tensor, alpha: float, top_n: int = 100) -> torch.Tensor:
    """The official algorithm as its authors run it: one row at a time, one candidate token at a time."""
    out = torch.full_like(logits, float("-inf"))
    for r in range(logits.shape[0]):
        probs = torch.softmax(logits[r], dim=-1)
        top_p, top_i = torch.topk(probs, min(top_n, probs.numel()))
        tau = alpha * -(top_p * torch.log2(top_p)).sum()
        entropy = torch.zeros(())
        keep = []
        for i in range(top_p.numel()):
            entropy = entropy - top_p[i] * torch.log2(top_p[i])
            if keep and entropy > tau:
                break
            keep.append(int(top_i[i]))
        out[r, keep] = logits[r, keep]
    return out


def timed(fn, x: torch.Tensor, repeats: int) -> float:
    fn(x.clone())  # warm-up
    samples = []
    for _ in range(repeats):
        y = x.clone()
        start = time.perf_counter()
        fn(y)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e3


def main() -> None:
    from transformers.generation.logits_process import TopHLogitsWarper
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    from llmgraft.kernels.top_h import top_h
    from llmgraft.report import bar_plot, format_table

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--vocabs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--alpha", type=float, default=0.4)
    parser.add_argument("--plot", help="also write a PNG: ms per method at the largest batch, per vocabulary")
    args = parser.parse_args()

    rows = []
    for vocab in args.vocabs:
        for batch in args.batches:
            x = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 3
            warper = TopHLogitsWarper(top_h=args.alpha)
            p = torch.full((batch,), 0.9)
            ms = {
                "ours": timed(lambda y: top_h(y, args.alpha), x, args.repeats),
                "ours_hf": timed(lambda y: top_h(y, args.alpha, variant="hf"), x, args.repeats),
                "official": timed(lambda y: official_loop(y, args.alpha), x, max(1, args.repeats // 2)),
                "hf": timed(lambda y: warper(None, y), x, args.repeats),
                "top_p": timed(lambda y: apply_top_k_top_p_pytorch(y, None, p), x, args.repeats),
            }
            rows.append([batch, vocab, ms["ours"], ms["ours_hf"], ms["official"], ms["hf"], ms["top_p"],
                         ms["hf"] / ms["ours"], ms["top_p"] / ms["ours"], ms["official"] / ms["ours"]])
            print(f"B={batch:3d} V={vocab:6d} done", flush=True)
    print()
    print(format_table(
        ["B", "V", "llmgraft ms", "llmgraft(hf) ms", "official loop ms", "HF warper ms", "vLLM top-p ms",
         "HF/ours", "top-p/ours", "official/ours"],
        rows, title=f"Top-H (alpha={args.alpha}, N=100) on {torch.get_num_threads()} threads; "
                    "ratios > 1 mean llmgraft is faster"))
    if args.plot:
        largest = max(args.batches)
        methods = ["llmgraft", "llmgraft (hf)", "official loop", "HF warper", "vLLM top-p"]
        panels = {f"B={largest}, V={r[1]:,} (ms, log)": r[2:7] for r in rows if r[0] == largest}
        print(f"plot written to {bar_plot(args.plot, methods, panels, 'Top-H time per call', log_scale=list(panels))}")


if __name__ == "__main__":
    main()
