"""Averaging mergers: the uniform average and MWA, metrics-weighted averaging of checkpoints (arXiv
2504.18580), as ``merger`` plugins.

MWA weighs checkpoints of one run by a metric: w_i ∝ loss_i^(−p) (lower loss weighs more) or step_i^p (later
weighs more), normalised; p = 0 is the uniform average and a large p selects the best checkpoint. The
paper's code and exact formula are not public: this definition is ours (``kernels.merging``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks.errors import ParamError
from ..hooks.families import Merger
from ..hooks.params import Params, choice, param
from ..hooks.specs import hookimpl
from ..kernels.merging import metric_weights


@dataclass(frozen=True)
class NoParams(Params):
    owner = "uniform"


@dataclass(frozen=True)
class MWAParams(Params):
    owner = "mwa"

    metric: str = choice("loss", ("loss", "step"),
                         help="loss: lower weighs more, w ~ loss^-p; step: later weighs more, w ~ step^p")
    penalty: float = param(1.0, range="[0, 1000]", help="p: 0 is the uniform average, large p the best input")


def weighted_average(inputs: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    out = torch.zeros(inputs[0].shape, dtype=torch.float32)
    for w, t in zip(weights, inputs):
        out.add_(t.float(), alpha=w)
    return out.to(inputs[0].dtype)


class Uniform(Merger):
    """The plain average of the inputs."""

    name = "uniform"
    description = "Uniform average of the inputs (baseline)"
    params_cls = NoParams
    linear = True

    def merge(self, name, base, inputs, per_input, params):
        return {"merged": weighted_average(inputs, [1.0 / len(inputs)] * len(inputs))}


class MWA(Merger):
    """Average checkpoints of one run, weighted by their training loss or step."""

    name = "mwa"
    description = "MWA: metrics-weighted averaging of checkpoints by loss or step (arXiv 2504.18580)"
    params_cls = MWAParams
    linear = True
    input_values = {"loss": "the checkpoint's training or validation loss (> 0)",
                    "step": "the checkpoint's training step (> 0)"}

    def weights(self, per_input: list[dict], params: MWAParams) -> list[float]:
        return metric_weights([v[params.metric] for v in per_input], params.penalty, params.metric == "loss")

    def check_inputs(self, per_input, params):
        missing = [i for i, v in enumerate(per_input) if params.metric not in v]
        if missing:
            raise ParamError(f"mwa: metric {params.metric!r} missing for input(s) {missing}: give it per input "
                             f"(--{params.metric}s, or a trainer_state.json beside each checkpoint)")
        bad = [v[params.metric] for v in per_input
               if isinstance(v[params.metric], bool) or not isinstance(v[params.metric], (int, float))
               or not v[params.metric] > 0]
        if bad:
            raise ParamError(f"mwa: every {params.metric} must be a positive number, got {bad}")

    def merge(self, name, base, inputs, per_input, params):
        return {"merged": weighted_average(inputs, self.weights(per_input, params))}


@hookimpl
def llmgraft_register_mergers(register):
    register(Uniform())
    register(MWA())
