"""Quantized matmuls on the CPU, and what quantization costs the bundled code LM.

    python benchmarks/bench_quant.py [--size 4096] [--rows 1 8 32] [--repeats 20] [--out PREFIX]

**Kernels**: ``x [M, size] @ W.T`` with W [size, size], group 128, interleaved, median of ``--repeats``:
dense float32 and bfloat16 (torch), W4A16 and ternary through torch's CPU int4 kernel (llmgraft's path), and
W4A16 through vLLM's ``cpu_gemm_wna16`` (its AWQ/GPTQ CPU kernel, bfloat16), the alternative the issue
asks to compare. Ratios are against dense bfloat16 measured in the same run. **Quality**: held-out loss of
the code LM (the held-out stdlib packages, 48 windows of 128 tokens) dense, W4A16 and ternary (post-training,
no recovery fine-tune), with each model's linear-weight bytes.
"""

from __future__ import annotations

import argparse
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


def quality():
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
        models = {"dense (float32)": (code_lm_path(), None)}
        for scheme in ("w4a16", "ternary"):
            report = Quantize().run(code_lm_path(), Path(scratch) / scheme, QuantizeParams(scheme=scheme), None)
            models[scheme] = (Path(scratch) / scheme, report)
        for label, (path, report) in models.items():
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            with torch.no_grad():
                loss = sum(float(model(input_ids=w, labels=w).loss) for w in windows.split(8)) / len(windows.split(8))
            size = report["bytes_after"] if report else None
            results.append({"model": label, "loss": loss, "linear_bytes": size})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", help="write <out>.md and <out>.json")
    args = parser.parse_args()

    from llmgraft.report import format_table, report_results

    kernel_rows = kernels(args.size, args.rows, args.repeats)
    names = list(kernel_rows[0]["ms"])
    headers = ["M"] + [f"{n} ms" for n in names] + ["w4a16 vs bf16", "ternary vs bf16"]
    rows = []
    for r in kernel_rows:
        ms = r["ms"]
        rows.append([r["rows"], *(f"{ms[n]:.3f}" for n in names),
                     f"{ms['dense bf16'] / ms['w4a16 (torch int4)']:.2f}x",
                     f"{ms['dense bf16'] / ms['ternary (torch int4)']:.2f}x"])
    quality_rows = quality()
    dense_loss = quality_rows[0]["loss"]
    notes = "```\n" + format_table(
        ["model", "held-out loss", "vs dense", "linear weights"],
        [[q["model"], f"{q['loss']:.3f}", f"{q['loss'] - dense_loss:+.3f}",
          f"{q['linear_bytes'] / 2**20:.2f} MiB" if q["linear_bytes"] else "6.50 MiB (bfloat16)"] for q in quality_rows],
        title="The code LM quantized after training (no recovery fine-tune), group 128") + "\n```\n\n" + (
        "Ratios > 1: faster than dense bfloat16. GPU (Triton) figures: not measured here (no GPU).")
    report_results(args.out, f"Quantized matmuls on this CPU: x [M, {args.size}] @ W [{args.size}, {args.size}]^T, "
                   f"group 128, median of {args.repeats}", headers, rows, notes=notes,
                   data={"kernels": kernel_rows, "quality": quality_rows})


if __name__ == "__main__":
    main()
