"""Train the bundled code LM: a small Llama on the standard library's source, on the CPU.

    python -m llmgraft.testing.code_lm --minutes 50 --out llmgraft/assets/code-lm

The result (config, bf16 safetensors, tokenizer, ``train_meta.json`` with held-out perplexity) is the
embedded default model of the demo and the quality benchmarks.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from .corpus import HELDOUT_PACKAGES, read_texts, stdlib_files
from .models import CODE_LM_DIR, code_lm_config, save_model_dir
from .tokenizer import train_bpe_tokenizer


def encode_corpus(tokenizer, split: str):
    """All files of a split as one token stream, files separated by EOS."""
    import torch

    ids = tokenizer(read_texts(stdlib_files(split)), add_special_tokens=False)["input_ids"]
    stream = []
    for doc in ids:
        stream.extend(doc)
        stream.append(tokenizer.eos_token_id)
    return torch.tensor(stream, dtype=torch.long)


def _windows(stream, seq_len: int, starts):
    import torch

    return torch.stack([stream[s: s + seq_len + 1] for s in starts.tolist()])


def heldout_loss(model, stream, seq_len: int = 256, max_windows: int = 256) -> float:
    """Mean next-token cross-entropy over non-overlapping held-out windows (deterministic)."""
    import torch

    n = min(max_windows, (len(stream) - 1) // seq_len)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, n, 16):
            starts = torch.arange(i, min(i + 16, n)) * seq_len
            batch = _windows(stream, seq_len, starts)
            logits = model(batch[:, :-1]).logits
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += batch[:, 1:].numel()
    return total / count


def train(out_dir: Path, minutes: float, seq_len: int = 256, batch_size: int = 16, lr: float = 3e-3,
          vocab_size: int = 4096, seed: int = 0, threads: int | None = None) -> dict:
    """Train for a wall-clock budget with a cosine schedule sized to it, then save atomically."""
    import torch
    from tqdm import tqdm
    from transformers import LlamaForCausalLM

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    tokenizer = train_bpe_tokenizer(vocab_size)
    train_stream = encode_corpus(tokenizer, "train")
    held_stream = encode_corpus(tokenizer, "heldout")
    model = LlamaForCausalLM(code_lm_config(len(tokenizer)))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)

    # Estimate the step budget from a few timed steps, then run a cosine schedule over it.
    budget_s = minutes * 60
    gen = torch.Generator().manual_seed(seed)
    warmup, step, total_steps = 50, 0, None
    t0 = time.time()
    bar = tqdm(desc="train code LM", unit="step")
    model.train()
    while True:
        elapsed = time.time() - t0
        if total_steps is None and step == 20:
            total_steps = max(100, int(budget_s / (elapsed / 20)))
            bar.total = total_steps
        if total_steps is not None and step >= total_steps:
            break
        horizon = total_steps or 10**9
        frac = min(1.0, step / horizon)
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        starts = torch.randint(0, len(train_stream) - seq_len - 1, (batch_size,), generator=gen)
        batch = _windows(train_stream, seq_len, starts)
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    train_seconds = time.time() - t0
    held = heldout_loss(model, held_stream, seq_len)
    meta = {
        "parameters": n_params, "steps": step, "tokens_seen": step * batch_size * seq_len,
        "train_seconds": round(train_seconds, 1), "train_tokens": len(train_stream),
        "heldout_packages": list(HELDOUT_PACKAGES), "heldout_tokens": len(held_stream),
        "heldout_loss": round(held, 4), "heldout_perplexity": round(math.exp(held), 2),
        "seq_len": seq_len, "batch_size": batch_size, "lr": lr, "seed": seed,
    }
    model = model.to(torch.bfloat16)
    save_model_dir(model, tokenizer, out_dir, {"train_meta.json": json.dumps(meta, indent=2) + "\n"})
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=CODE_LM_DIR)
    parser.add_argument("--minutes", type=float, default=50.0)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    meta = train(args.out, args.minutes, args.seq_len, args.batch_size, args.lr, threads=args.threads)
    print(json.dumps(meta, indent=2))


if __name__ == "__main__":
    main()
