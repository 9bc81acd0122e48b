"""``llmgraft demo quant``: the bundled code LM quantized to W4A16 and to Sherry 1.25-bit ternary by
``llmgraft quantize``, then loaded by transformers (held-out perplexity) and served by vLLM (no flag: the
checkpoint names its method), against the dense model; with each format's CPU matmul speed against bf16."""

from __future__ import annotations

import gc
import math
import os
import time
from pathlib import Path


def _matmul_speedup(label: str) -> str:
    """The scheme's CPU matmul against dense bfloat16 at x [1, 4096] @ W [4096, 4096]^T (median of 20)."""
    import statistics

    import torch

    from .hooks import get_registry
    from .testing.retention_eval import median_seconds

    if label not in get_registry().names("quant_scheme"):
        return "1.00x"
    scheme = get_registry().get("quant_scheme", label)
    params = scheme.params_cls()
    weight = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0)) * 0.02
    state = scheme.prepare(scheme.quantize(weight, params), params)
    x, dense = torch.randn(1, 4096).bfloat16(), weight.bfloat16()
    times = median_seconds({"bf16": lambda: x @ dense.T, "quant": lambda: scheme.matmul(x, state, params)}, 20)
    return f"{statistics.median(times['bf16']) / statistics.median(times['quant']):.2f}x"


def run_quant_demo(scratch: str | Path | None = None) -> list[list]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: seconds to start
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from .integrations.transformers import GraftLogitsProcessor  # noqa: F401  (registers the quantizers)
    from .offline.checkpoints import Checkpoint
    from .plugins.quant import Quantize, QuantizeParams
    from .demo import PROMPTS
    from .report import format_table
    from .testing.code_lm import encode_corpus
    from .testing.engine import cpu_engine
    from .testing.models import code_lm_path, load_tokenizer

    start = time.perf_counter()
    scratch = Path(scratch or Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-demo-quant")
    models = {"dense (bf16)": code_lm_path()}
    for scheme in ("w4a16", "ternary"):
        out = scratch / scheme
        if not (out / "config.json").is_file():
            Quantize().run(code_lm_path(), out, QuantizeParams(scheme=scheme), None)
        models[scheme] = out
    stream = encode_corpus(load_tokenizer(), "heldout")
    windows = stream[: (len(stream) // 128) * 128].view(-1, 128)[:32]
    prompts = list(PROMPTS)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    rows, sample = [], {}
    for label, path in models.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            loss = sum(float(model(input_ids=w, labels=w).loss) for w in windows.split(8)) / len(windows.split(8))
        del model
        checkpoint = Checkpoint(path)
        weights = sum(i.nbytes for n, i in checkpoint.tensors.items() if ".layers." in n and "norm" not in n)
        checkpoint.close()
        llm = cpu_engine(path, max_model_len=256)
        llm.generate(prompts[:2], params, use_tqdm=False)
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        rate = sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - begin)
        sample[label] = outputs[0].outputs[0].text
        del llm
        gc.collect()
        rows.append([label, f"{weights / 2**20:.2f}", f"{math.exp(loss):.2f}", f"{rate:,.0f}",
                     _matmul_speedup(label)])
    print(format_table(["model", "decoder-layer weights MiB", "held-out perplexity", "vLLM tok/s",
                        "4096² matmul at M=1 vs bf16"], rows,
                       title="The code LM, quantized after training (group 128, no recovery fine-tune)"))
    for label, text in sample.items():
        print(f"{label:>12}: {PROMPTS[0] + text[:60]!r}")
    print(f"({time.perf_counter() - start:.0f} s; checkpoints in {scratch}; kernels: benchmarks/bench_quant.py)")
    return rows
