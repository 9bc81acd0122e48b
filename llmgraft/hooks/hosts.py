"""What a model pass may ask of a model framework, without importing one.

Offline passes (``Optimizer.run``) that need a live model (gradients on calibration data, a distillation
run) receive a :class:`ModelHost`; ``llmgraft.integrations.transformers.host.TransformersHost`` is the one
llmgraft ships (transformers models, HF ``Trainer``, so the same run works under accelerate, DeepSpeed or
FSDP). The pass keeps the algorithm (what to score, which loss), the host only runs models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch

#: ``loss(student_logits [B, T, V], teacher_logits [B, T, V]) -> scalar``.
DistillLoss = Callable[["torch.Tensor", "torch.Tensor"], "torch.Tensor"]


@dataclass
class GLUWeights:
    """One gated MLP (a routed expert, or a shared one) in checkpoint orientation, with the gradients that
    the host accumulated: ``gate``/``up`` [I, H] (a neuron is a row), ``down`` [H, I] (a neuron is a column).
    ``expert`` is the expert's index, or None for a shared expert."""

    layer: int
    expert: int | None
    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate_grad: torch.Tensor
    up_grad: torch.Tensor
    down_grad: torch.Tensor


@dataclass
class AttentionWeights:
    """One attention layer's projections with their gradients, in checkpoint orientation: ``q``/``k``/``v``
    [heads·head_dim or kv_heads·head_dim, H] (a head is a block of rows), ``o`` [H, heads·head_dim] (a head
    is a block of columns)."""

    layer: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_grad: torch.Tensor
    k_grad: torch.Tensor
    v_grad: torch.Tensor
    o_grad: torch.Tensor
    heads: int
    kv_heads: int
    head_dim: int


class ModelHost(Protocol):
    def token_windows(self, model_dir: Path, text_file: Path, tokens: int, seq_len: int) -> torch.Tensor:
        """``text_file`` tokenized with the model's tokenizer, cut into [N, seq_len] windows, at most ``tokens``
        tokens in all; an error when it holds fewer than one batch's worth."""

    def gradients(self, student_dir: Path, teacher_dir: Path, windows: torch.Tensor, loss: DistillLoss,
                  batch_size: int) -> Iterator[GLUWeights | AttentionWeights]:
        """The student's expert and attention weights with the gradient of the mean ``loss`` against the frozen
        teacher over ``windows``, one gated MLP or attention layer at a time."""

    def distil(self, student_dir: Path, teacher_dir: Path, windows: torch.Tensor, loss: DistillLoss, steps: int,
               lr: float, batch_size: int, out_dir: Path, seed: int) -> dict:
        """Train the student to ``loss`` against the frozen teacher for ``steps`` steps and save it to
        ``out_dir`` (a loadable checkpoint directory, safetensors); returns the training metrics."""

    def evaluate(self, model_dir: Path, windows: torch.Tensor, batch_size: int) -> float:
        """The model's mean next-token loss on ``windows``."""
