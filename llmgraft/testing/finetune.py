"""Fine-tunes of the bundled code LM on single standard-library packages ("tasks"), with HF ``Trainer``, for
the merging demo, tests and benchmarks. The packages are from the code LM's held-out split, so each
fine-tune visibly learns its task. Checkpoints are ordinary HF directories (safetensors, config, tokenizer)
with the ``trainer_state.json`` that Trainer writes, as MWA reads it.
"""

from __future__ import annotations

from pathlib import Path

from .code_lm import heldout_loss
from .corpus import read_texts, stdlib_files
from .models import code_lm_path, load_tokenizer

#: Held-out packages of the code LM, one task each.
TASKS = ("json", "html", "urllib", "xmlrpc")


#: Streams are cut into blocks of this many tokens, dealt to the splits in turn.
_BLOCK = 512


def task_stream(package: str, split: str = "train", tokenizer=None):
    """One package's files as an EOS-separated token stream, cut into 512-token blocks: of every 6 blocks
    one goes to ``val``, one to ``test`` and four to ``train``, so the splits share one distribution."""
    import torch

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, not {split!r}")
    tokenizer = tokenizer or load_tokenizer()
    files = stdlib_files("all", packages=(package,))
    if not files:
        raise ValueError(f"no standard-library files for package {package!r}")
    stream: list[int] = []
    for ids in tokenizer(read_texts(files), add_special_tokens=False)["input_ids"]:
        stream += ids + [tokenizer.eos_token_id]
    blocks = [stream[i:i + _BLOCK] for i in range(0, len(stream), _BLOCK)]
    role = {0: "val", 3: "test"}
    chosen = [t for i, block in enumerate(blocks) if role.get(i % 6, "train") == split for t in block]
    return torch.tensor(chosen)


def task_loss(model, package: str, split: str = "test", windows: int = 32, seq_len: int = 128) -> float:
    """Mean next-token loss of ``model`` on a split (default: test) of ``package``."""
    return heldout_loss(model, task_stream(package, split), seq_len=seq_len, max_windows=windows)


def finetune(package: str, out_dir: str | Path, steps: int = 40, lr: float = 1e-3, batch_size: int = 8,
             seq_len: int = 128, save_steps: int | None = None, seed: int = 0, base: str | Path | None = None
             ) -> Path:
    """Fully fine-tune the code LM on ``package`` with HF Trainer; returns the final model directory.

    With ``save_steps``, Trainer's own ``checkpoint-<step>`` directories (weights and trainer_state.json,
    no optimizer state) stay beside it in ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from ..io import atomic_directory

    out_dir = Path(out_dir)
    tokenizer = load_tokenizer()
    train, evaluation = task_stream(package, "train", tokenizer), task_stream(package, "val", tokenizer)

    class Windows(torch.utils.data.Dataset):
        def __init__(self, stream, count):
            gen = torch.Generator().manual_seed(seed)
            self.starts = torch.randint(0, len(stream) - seq_len - 1, (count,), generator=gen)
            self.stream = stream

        def __len__(self):
            return len(self.starts)

        def __getitem__(self, i):
            window = self.stream[self.starts[i]: self.starts[i] + seq_len]
            return {"input_ids": window, "labels": window.clone()}

    model = AutoModelForCausalLM.from_pretrained(str(base or code_lm_path()), dtype=torch.float32)
    with atomic_directory(out_dir) as tmp:
        args = TrainingArguments(
            output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, logging_steps=max(1, (save_steps or steps) // 2),
            save_strategy="steps" if save_steps else "no", save_steps=save_steps or steps, save_only_model=True,
            eval_strategy="steps" if save_steps else "no", eval_steps=save_steps or steps,
            per_device_eval_batch_size=batch_size, report_to=[], seed=seed, use_cpu=True,
            dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=Windows(train, steps * batch_size),
                          eval_dataset=Windows(evaluation, 4 * batch_size))
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # the logs go to trainer_state.json, not the terminal
        trainer.train()
        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp / "final", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "final")
        for checkpoint in tmp.glob("checkpoint-*"):
            tokenizer.save_pretrained(checkpoint)
    return out_dir / "final"


def adapter_finetune(package: str, config, steps: int = 300, lr: float = 2e-3, batch_size: int = 8,
                     seq_len: int = 128, seed: int = 0, out: str | Path | None = None, progress: bool = False,
                     save_every: int | None = None) -> dict:
    """Train a PEFT adapter (any ``PeftConfig``: LoRA, MoS, ...) on the code LM for ``package`` with a plain
    AdamW loop at constant ``lr``; report its trainable parameters, test loss and milliseconds per step.
    With ``out``, the adapter is saved there (``save_pretrained``); with ``save_every`` too, every that many
    steps into ``out/checkpoint-<step>``, beside a ``trainer_state.json`` as HF Trainer writes it (the step,
    and the validation loss as ``eval_loss``), so checkpoint merges (MWA) read them like Trainer's."""
    import json
    import time

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    train = task_stream(package, "train")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(code_lm_path()), dtype=torch.float32), config)
    trainable = model.get_nb_trainable_parameters()[0]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    times = []
    steps_iter = range(steps)
    if progress:
        from tqdm import tqdm

        steps_iter = tqdm(steps_iter, desc=f"{type(config).__name__} on {package}", unit="step", leave=False)
    if save_every is not None and out is None:
        raise ValueError("save_every needs out (the directory the checkpoints go into)")
    for step in steps_iter:
        starts = torch.randint(0, len(train) - seq_len - 1, (batch_size,), generator=gen)
        batch = torch.stack([train[s: s + seq_len] for s in starts.tolist()])
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        if save_every and (step + 1) % save_every == 0:
            model.eval()
            checkpoint = Path(out) / f"checkpoint-{step + 1}"
            model.save_pretrained(str(checkpoint))
            history = [{"eval_loss": task_loss(model, package, "val"), "step": step + 1}]
            (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": step + 1,
                                                                       "log_history": history}))
            model.train()
    model.eval()
    result = {"trainable": trainable, "test_loss": task_loss(model, package),
              "ms_per_step": 1000 * sorted(times)[len(times) // 2], "steps": steps}
    if out is not None:
        model.save_pretrained(str(out))
    return result
