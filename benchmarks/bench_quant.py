"""Quantized matmuls on the CPU, and what quantization costs the bundled code LM.

    python benchmarks/bench_quant.py [--sizes 2048 4096] [--rows 1 8 64] [--repeats 20] [--out PREFIX]

**Kernels**: ``x [M, K] @ W.T`` with W [K, K] (K = N in ``--sizes``), group 128, interleaved, median of
``--repeats``:
dense float32 and bfloat16 (torch), W4A16 and ternary through torch's CPU int4 kernel (llmgraft's path), and
W4A16 through vLLM's ``cpu_gemm_wna16`` (its AWQ/GPTQ CPU kernel, bfloat16), the alternative the issue
asks to compare. Ratios are against dense bfloat16 measured in the same run. **Model**: the code LM dense
(its bf16 checkpoint), W4A16 and ternary (post-training, no recovery fine-tune): linear-weight and whole-
checkpoint bytes, held-out perplexity (the held-out stdlib packages, 48 windows of 128 tokens) and vLLM
decode tokens/s (bfloat16 engines, 16 requests x 64 tokens, best of 3).
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path


def kernels(size: int, rows: list[int], repeats: int):
    import torch

    from llmgraft import get_registry
    from llmgraft.testing.retention_eval import median_seconds

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(size, size, generator=gen) * 0.02
    registry = get_registry()
    w4, ternary = registry.get("quant_scheme", "w4a16"), registry.get("quant_scheme", "ternary")
    params = w4.params_cls()
    w4_state = w4.prepare(w4.quantize(weight, params), params)
    ternary_state = ternary.prepare(ternary.quantize(weight, params), params)
    dense_bf16 = weight.bfloat16()
    vllm_gemm = _vllm_wna16(w4.quantize(weight, params), params.group)
    probe = torch.randn(4, size, generator=gen).bfloat16()
    reference = probe.float() @ w4.dequantize(w4.quantize(weight, params), params).T
    for label, run in (("llmgraft", lambda: w4.matmul(probe, w4_state, params)), ("vLLM", lambda: vllm_gemm(probe))):
        if (label == "vLLM" and vllm_gemm is None) or torch.allclose(run().float(), reference, atol=0.02, rtol=0.02):
            continue
        raise AssertionError(f"{label}'s W4A16 matmul does not match the dequantized weight")
    out = []
    for m in rows:
        x = torch.randn(m, size, generator=gen)
        xb = x.bfloat16()
        runs = {"dense fp32": lambda: x @ weight.T, "dense bf16": lambda: xb @ dense_bf16.T,
                "w4a16 (torch int4)": lambda: w4.matmul(xb, w4_state, params),
                "ternary (torch int4)": lambda: ternary.matmul(xb, ternary_state, params)}
        if vllm_gemm is not None:
            runs["w4a16 (vLLM cpu_gemm_wna16)"] = lambda: vllm_gemm(xb)
        with torch.no_grad():
            times = median_seconds(runs, repeats, warmup=2)
        out.append({"rows": m, "ms": {name: statistics.median(t) * 1e3 for name, t in times.items()}})
    return out


def _vllm_wna16(stored, group):
    """vLLM's CPU W4A16 GEMM on the same weights (its GPTQ layout: int32 words of 8 codes), or None."""
    try:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.quantization.utils.quant_utils import pack_quantized_values_into_int32
        from vllm.scalar_type import scalar_types
    except ImportError:
        return None
    from llmgraft.kernels.quant import unpack_nibbles

    q = unpack_nibbles(stored["qweight"]).T.contiguous().int()                     # [K, N]
    k = q.shape[0]
    words = pack_quantized_values_into_int32(q, scalar_types.uint4, 1)
    qweight = words.view(k, -1, 2).permute(1, 0, 2).reshape(-1, k * 2).contiguous()
    zeros = pack_quantized_values_into_int32(stored["zeros"].T.contiguous().int(), scalar_types.uint4, 1)
    scales = stored["scales"].T.contiguous()

    def run(x):
        return ops.cpu_gemm_wna16(x, qweight, scales.to(x.dtype), zeros, None, 8, "vec")
    return run


def decode_rate(path) -> float:
    import gc
    import os
    import time

    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import SamplingParams

    from llmgraft.demo import PROMPTS
    from llmgraft.testing.engine import cpu_engine

    llm = cpu_engine(path, max_model_len=256, dtype="bfloat16")
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    prompts = (list(PROMPTS) * 2)[:16]
    llm.generate(prompts[:2], params, use_tqdm=False)
    best = 0.0
    for _ in range(3):
        start = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        best = max(best, sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - start))
    del llm
    gc.collect()
    return best


def report_dense(path) -> int:
    """Bytes of the linear weights that the quantize pass would convert, in the dense checkpoint."""
    import re

    from llmgraft.offline.checkpoints import Checkpoint
    from llmgraft.plugins.quant import DEFAULT_MODULES

    checkpoint = Checkpoint(path)
    try:
        return sum(i.nbytes for n, i in checkpoint.tensors.items()
                   if n.endswith(".weight") and re.search(DEFAULT_MODULES, n[: -len(".weight")]))
    finally:
        checkpoint.close()


def quality(vllm: bool = True):
    import torch
    from transformers import AutoModelForCausalLM

    import llmgraft.integrations.transformers  # noqa: F401  (registers the quantizers)
    from llmgraft.plugins.quant import Quantize, QuantizeParams
    from llmgraft.testing.code_lm import encode_corpus
    from llmgraft.testing.models import code_lm_path, load_tokenizer

    stream = encode_corpus(load_tokenizer(), "heldout")
    windows = stream[: (len(stream) // 128) * 128].view(-1, 128)[:48]
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        models = {"dense (bf16)": (code_lm_path(), None)}
        for scheme in ("w4a16", "ternary"):
            report = Quantize().run(code_lm_path(), Path(scratch) / scheme, QuantizeParams(scheme=scheme), None)
            models[scheme] = (Path(scratch) / scheme, report)
        for label, (path, report) in models.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                loss = sum(float(model(input_ids=w, labels=w).loss) for w in windows.split(8)) / len(windows.split(8))
            size = report["bytes_after"] if report else report_dense(path)
            files = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
            results.append({"model": label, "loss": loss, "perplexity": math.exp(loss), "linear_bytes": size,
                            "checkpoint_bytes": files, "decode_tok_s": decode_rate(path) if vllm else None})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM decode rates")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args()

    from llmgraft.report import format_table, report_results

    kernel_rows = [{**r, "size": size} for size in args.sizes for r in kernels(size, args.rows, args.repeats)]
    names = list(kernel_rows[0]["ms"])
    headers = ["K = N", "M"] + [f"{n} ms" for n in names] + ["w4a16 vs bf16", "ternary vs bf16"]
    rows = []
    for r in kernel_rows:
        ms = r["ms"]
        rows.append([r["size"], r["rows"], *(f"{ms[n]:.3f}" for n in names),
                     f"{ms['dense bf16'] / ms['w4a16 (torch int4)']:.2f}x",
                     f"{ms['dense bf16'] / ms['ternary (torch int4)']:.2f}x"])
    quality_rows = quality(vllm=not args.no_vllm)
    dense = quality_rows[0]
    notes = "```\n" + format_table(
        ["model", "linear weights", "vs bf16", "checkpoint", "held-out perplexity", "vs bf16", "vLLM decode tok/s"],
        [[q["model"], f"{q['linear_bytes'] / 2**20:.2f} MiB", f"{q['linear_bytes'] / dense['linear_bytes']:.3f}x",
          f"{q['checkpoint_bytes'] / 2**20:.2f} MiB", f"{q['perplexity']:.2f}",
          f"{q['perplexity'] / dense['perplexity'] - 1:+.1%}",
          f"{q['decode_tok_s']:,.0f}" if q["decode_tok_s"] else ""] for q in quality_rows],
        title="The code LM quantized after training (no recovery fine-tune), group 128") + "\n```\n\n" + (
        "Ratios > 1: faster than dense bfloat16. GPU (Triton) figures: not measured here (no GPU).")
    report_results(args.out, f"Quantized matmuls on this CPU: x [M, K] @ W [K, K]^T, group 128, median of "
                   f"{args.repeats}", headers, rows, notes=notes,
                   data={"kernels": kernel_rows, "quality": quality_rows})


if __name__ == "__main__":
    main()
