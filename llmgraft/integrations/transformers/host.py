"""transformers as the model host of offline passes (``llmgraft.hooks.hosts.ModelHost``): tokenizing
calibration text, the gradients of a loss against a frozen teacher, and distillation with HF ``Trainer``.

Distillation runs through ``Trainer``, so one stage runs unchanged on several processes or GPUs::

    accelerate launch --multi_gpu --num_processes 2 -m llmgraft.integrations.transformers.host distil \\
        --student PRUNED --teacher SOURCE --calib FILE --steps 100 --out DISTILLED

(with a DeepSpeed or FSDP accelerate config on GPUs; on a machine without GPUs the same command runs DDP
over gloo, while accelerate 1.15's ``--cpu --num_processes 2`` starts one process unless mpirun is set up).
Experts are read in transformers' fused layout (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first;
``mlp.experts.down_proj`` [E, H, I]) and handed to the pass in checkpoint orientation.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from ...hooks import CheckpointError, ParamError
from ...hooks.hosts import AttentionWeights, DistillLoss, GLUWeights

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def _load(path: Path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), batch_size):
        yield windows[start:start + batch_size]


class TransformersHost:
    """The :class:`~llmgraft.hooks.hosts.ModelHost` for transformers models (float32 on the CPU, or the
    device ``Trainer`` picks)."""

    def token_windows(self, model_dir: Path, text_file: str | Path, tokens: int, seq_len: int) -> torch.Tensor:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        stream: list[int] = []
        if str(text_file) == "stdlib":
            from ...testing.corpus import read_texts, stdlib_files

            for text in read_texts(stdlib_files("train")):
                stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id or 0]
                if len(stream) >= tokens:
                    break
        else:
            path = Path(text_file)
            if not path.is_file():
                raise CheckpointError(f"calibration file {path} does not exist")
            stream = tokenizer(path.read_text(encoding="utf-8", errors="replace"),
                               add_special_tokens=False)["input_ids"]
        count = min(tokens, len(stream)) // seq_len
        if count < 1:
            raise ParamError(f"calibration data too short: {len(stream)} tokens, less than one {seq_len}-token window")
        return torch.tensor(stream[:count * seq_len]).view(count, seq_len)

    def gradients(self, student_dir: Path, teacher_dir: Path, windows: torch.Tensor, loss: DistillLoss,
                  batch_size: int) -> Iterator[GLUWeights | AttentionWeights]:
        student, teacher = _load(student_dir).eval(), _load(teacher_dir).eval()
        student.zero_grad(set_to_none=True)
        for batch in _batches(windows, batch_size):
            with torch.no_grad():
                target = teacher(input_ids=batch).logits
            (loss(student(input_ids=batch).logits, target) * (len(batch) / len(windows))).backward()
        del teacher
        config = student.config
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        for index, layer in enumerate(student.model.layers):
            attention = layer.self_attn
            parts = [getattr(attention, f"{p}_proj").weight for p in "qkvo"]
            yield AttentionWeights(index, *(p.detach() for p in parts), *(p.grad for p in parts), heads, kv_heads,
                                   head_dim)
            mlp = getattr(layer, "mlp", None)
            experts = getattr(mlp, "experts", None)
            if experts is None:
                continue  # a dense layer (Qwen2-MoE's decoder_sparse_step)
            if not hasattr(experts, "gate_up_proj"):
                raise CheckpointError(f"layer {index}: experts in an unknown layout ({type(experts).__name__}); "
                                      "expected transformers' fused gate_up_proj/down_proj")
            size = experts.gate_up_proj.shape[1] // 2
            gate_up, down = experts.gate_up_proj.detach(), experts.down_proj.detach()
            gate_up_grad, down_grad = experts.gate_up_proj.grad, experts.down_proj.grad
            for e in range(gate_up.shape[0]):
                yield GLUWeights(index, e, gate_up[e, :size], gate_up[e, size:], down[e], gate_up_grad[e, :size],
                                 gate_up_grad[e, size:], down_grad[e])
            shared = getattr(mlp, "shared_expert", None)
            if shared is not None:
                parts = (shared.gate_proj.weight, shared.up_proj.weight, shared.down_proj.weight)
                yield GLUWeights(index, None, *(p.detach() for p in parts), *(p.grad for p in parts))

    def distil(self, student_dir: Path, teacher_dir: Path, windows: torch.Tensor, loss: DistillLoss, steps: int,
               lr: float, batch_size: int, out_dir: Path, seed: int) -> dict:
        from transformers import Trainer, TrainingArguments

        from ...io import atomic_directory

        student, teacher = _load(student_dir), _load(teacher_dir).eval().requires_grad_(False)
        dtype = json.loads((Path(student_dir) / "config.json").read_text()).get("dtype") or "float32"

        class Distiller(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                ids = inputs["input_ids"]
                with torch.no_grad():
                    target = teacher.to(ids.device)(input_ids=ids).logits
                value = loss(model(input_ids=ids).logits, target)
                return (value, None) if return_outputs else value

        scratch = Path(out_dir).parent / f".{Path(out_dir).name}.trainer"
        args = TrainingArguments(
            output_dir=str(scratch), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=max(1, steps // 4),
            save_strategy="no", report_to=[], seed=seed, use_cpu=not torch.cuda.is_available(),
            dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False, ddp_backend=None)
        data = [{"input_ids": row} for row in windows]
        trainer = Distiller(model=student, args=args, train_dataset=data)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        result = trainer.train()
        if trainer.is_world_process_zero():
            with atomic_directory(out_dir) as tmp:
                trainer.model.to(getattr(torch, str(dtype).removeprefix("torch."), torch.float32))
                trainer.model.save_pretrained(str(tmp), safe_serialization=True)
                for name in _TOKENIZER_FILES:
                    if (Path(student_dir) / name).is_file():
                        shutil.copy2(Path(student_dir) / name, tmp / name)
        trainer.accelerator.wait_for_everyone()
        shutil.rmtree(scratch, ignore_errors=True)
        return {"train_loss": result.training_loss, "processes": trainer.args.world_size}

    def evaluate(self, model_dir: Path, windows: torch.Tensor, batch_size: int) -> float:
        model = _load(model_dir).eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in _batches(windows, batch_size):
                logits = model(input_ids=batch[:, :-1]).logits
                total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(),
                                                           reduction="sum").item()
                count += batch[:, 1:].numel()
        return total / count


def main(argv: list[str] | None = None) -> None:
    """``distil``: one SlimMoE distillation stage (the student is an already pruned checkpoint)."""
    from ...plugins.slim_moe import kd_loss

    parser = argparse.ArgumentParser(prog="python -m llmgraft.integrations.transformers.host")
    sub = parser.add_subparsers(dest="command", required=True)
    distil = sub.add_parser("distil", help="distil a student checkpoint from a teacher with Trainer")
    distil.add_argument("--student", required=True)
    distil.add_argument("--teacher", required=True)
    distil.add_argument("--calib", default="stdlib", help="text file, or 'stdlib'")
    distil.add_argument("--steps", type=int, required=True)
    distil.add_argument("--batch-size", type=int, default=8)
    distil.add_argument("--seq-len", type=int, default=128)
    distil.add_argument("--lr", type=float, default=5e-4)
    distil.add_argument("--top-k", type=int, default=8)
    distil.add_argument("--seed", type=int, default=0)
    distil.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    host = TransformersHost()
    windows = host.token_windows(Path(args.teacher), args.calib, args.steps * args.batch_size * args.seq_len,
                                 args.seq_len)
    report = host.distil(Path(args.student), Path(args.teacher), windows,
                         lambda s, t: kd_loss(s, t, args.top_k), args.steps, args.lr, args.batch_size,
                         Path(args.out), args.seed)
    sys.stdout.write(json.dumps(report) + "\n")  # one write: ranks share the launcher's stdout
    sys.stdout.flush()


if __name__ == "__main__":
    main()
