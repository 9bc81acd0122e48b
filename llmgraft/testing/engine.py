"""The one place that starts a CPU vLLM engine for the demo, the benchmarks and the tests, and that
replays vLLM's completions through transformers to get the logits behind every sampled token."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def set_cpu_engine_env(scratch: Path, quiet: bool = True) -> None:
    """Environment for a fast, local, in-process vLLM CPU engine (unless the caller already set it).

    Must run before vLLM is imported.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(scratch / "vllm-cache"))
    if quiet:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def cpu_engine(model: str | Path, *, max_num_seqs: int = 16, max_model_len: int = 1024,
               kv_cache_bytes: int = 64 << 20, seed: int = 0, **overrides: Any):
    """An in-process vLLM engine on the CPU: float32, eager, KV cache sized (vLLM would take ~9 GiB)."""
    from vllm import LLM

    args = dict(model=str(model), distributed_executor_backend="uni", enforce_eager=True, dtype="float32",
                kv_cache_memory_bytes=kv_cache_bytes, max_model_len=max_model_len, seed=seed,
                max_num_seqs=max_num_seqs)
    return LLM(**{**args, **overrides})


def completion_logits(hf_model, request_output) -> list[tuple[Any, list[int]]]:
    """For each completion of one vLLM ``RequestOutput``: the model's (unscaled) logits before each
    generated token, [steps, V], from one transformers forward pass, and the generated tokens."""
    import torch

    prompt = list(request_output.prompt_token_ids)
    out = []
    with torch.no_grad():
        for completion in request_output.outputs:
            tokens = list(completion.token_ids)
            logits = hf_model(torch.tensor([prompt + tokens])).logits[0]
            out.append((logits[len(prompt) - 1: len(prompt) - 1 + len(tokens)], tokens))
    return out
