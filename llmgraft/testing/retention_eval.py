"""Measuring token retention: held-out prompts, next-token quality against the full model, KV-cache size
and interleaved timings. Used by ``llmgraft demo distill`` and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def heldout_prompts(length: int, count: int):
    """``count`` prompts [count, length] cut from the code LM's held-out stdlib files, one per file where
    the files are long enough (then consecutive windows of the held-out stream)."""
    from .code_lm import encode_corpus
    from .models import load_tokenizer

    stream = encode_corpus(load_tokenizer(), "heldout")
    usable = (len(stream) // length) * length
    windows = stream[:usable].view(-1, length)
    step = max(1, len(windows) // count)
    return windows[::step][:count].clone()


def kl_and_agreement(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || other) in nats and the fraction of rows with the same top token."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    same = (reference.argmax(-1) == other.argmax(-1)).double()
    return float(kl.mean()), float(same.mean())


def cache_bytes(cache) -> list[int]:
    """Bytes of keys and values each layer of a transformers cache holds."""
    return [(layer.keys.numel() + layer.values.numel()) * layer.keys.element_size() if layer.keys is not None else 0
            for layer in cache.layers]


def median_seconds(runs: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall times of each named run, interleaved (one of each per round, so drift hits all alike)."""
    for _ in range(warmup):
        for run in runs.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times
