"""Scoring a model directory on a text file (mean next-token loss), for choices made offline: TALL's λ per
task (``llmgraft tall build --select-lam``)."""

from __future__ import annotations

from pathlib import Path


def text_loss(model_dir: str | Path, text_file: str | Path, seq_len: int = 256, max_windows: int = 64) -> float:
    """Mean next-token cross-entropy of the model in ``model_dir`` over non-overlapping windows of a text file,
    tokenised with the model directory's own tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ...hooks.errors import ParamError

    text = Path(text_file).read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    windows = min(max_windows, (len(ids) - 1) // seq_len)
    if windows < 1:
        raise ParamError(f"{text_file}: {len(ids)} tokens, fewer than one window of {seq_len + 1}")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    total = 0.0
    with torch.no_grad():
        for i in range(windows):
            window = ids[i * seq_len: i * seq_len + seq_len + 1].unsqueeze(0)
            logits = model(window[:, :-1]).logits
            total += float(torch.nn.functional.cross_entropy(logits[0].float(), window[0, 1:]))
    return total / windows
