"""Task-vector mergers: task arithmetic, TIES, TALL masks and Consensus, one class under four registered names
(as mergekit's generalised task arithmetic). Each is a pure function of the base and the inputs' tensors;
the formulas are in ``llmgraft.kernels.merging``.

* ``task_arithmetic``: θ₀ + λ·Σ_i w_i τ_i;
* ``ties``: θ₀ + λ·TIES(τ) (trim to ``density``, elect signs, disjoint mean);
* ``tall``: the multi-task vector τ_MTL = Σ_t τ_t and one mask per task, m_t = |τ_t| > λ_t·|τ_MTL − τ_t|,
  from which ``llmgraft tall rebuild`` rebuilds θ_t = θ₀ + m_t ⊙ τ_MTL;
* ``consensus``: θ₀ + α·(τ ⊙ [Σ_t m_t ≥ k]), τ the task-arithmetic sum or the TIES disjoint sum, with the
  masks built around that same τ (as the official ``tall_masks`` code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..hooks.errors import ParamError
from ..hooks.families import Merger
from ..hooks.params import Params, choice, param
from ..hooks.specs import hookimpl
from ..kernels.merging import (consensus, magnitude_threshold, tall_masks, task_vectors, ties_vector,
                               trim)

_WEIGHT = {"weight": "scale of this input's task vector (default 1)"}
_LAM = {"lam": "TALL lambda of this task (default: the lam parameter)"}


@dataclass(frozen=True)
class TaskArithmeticParams(Params):
    owner = "task_arithmetic"
    scale: float = param(1.0, range="[-100, 100]", help="lambda: the scale of the summed task vectors (< 0: negation)")


@dataclass(frozen=True)
class TiesParams(Params):
    owner = "ties"
    density: float = param(0.2, range="(0, 1]", help="fraction of each task vector's largest entries kept")
    scale: float = param(1.0, range="[-100, 100]", help="lambda: the scale of the merged task vector")


@dataclass(frozen=True)
class TallParams(Params):
    owner = "tall"
    lam: float = param(0.4, range="[0, 100]", help="mask threshold: m_t = |tau_t| > lam |tau_MTL - tau_t|")


@dataclass(frozen=True)
class ConsensusParams(Params):
    owner = "consensus"
    k: int = param(2, range="[1, 1000]", help="keep entries present in at least k task masks")
    lam: float = param(0.4, range="[0, 100]", help="TALL mask threshold of every task")
    scale: float = param(1.0, range="[-100, 100]", help="alpha: the scale of the kept task vector")
    base_method: str = choice("task_arithmetic", ("task_arithmetic", "ties"),
                              help="the task vector the consensus mask filters")
    density: float = param(0.2, range="(0, 1]", help="TIES trim density (base_method ties)")


def _weights(per_input) -> list[float]:
    return [float(v.get("weight", 1.0)) for v in per_input]


class TaskVectors(Merger):
    """Task arithmetic, TIES, TALL or Consensus, by ``kind``: one class, four registered mergers."""

    needs_base = True

    def __init__(self, kind: str, description: str, params_cls: type[Params], input_values: dict[str, str],
                 outputs: tuple[str, ...] = (), merged_is: str = "model") -> None:
        self.name, self.kind, self.description, self.params_cls = kind, kind, description, params_cls
        self.input_values, self.outputs, self.merged_is = input_values, outputs, merged_is
        self.linear = kind == "task_arithmetic"

    def check_inputs(self, per_input, params):
        for i, values in enumerate(per_input):
            for key, low in (("weight", -math.inf), ("lam", 0.0)):  # a negative weight negates a task
                value = values.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                          or value < low):
                    bound = "a number" if low == -math.inf else "a number >= 0"
                    raise ParamError(f"{self.name}: input {i}: {key} must be {bound}, got {value!r}")
        if self.kind == "consensus" and params.k > len(per_input):
            raise ParamError(f"consensus: k={params.k} exceeds the number of inputs ({len(per_input)}): no entry "
                             "could be kept")

    def needs_tensor_stats(self, params):
        return self.kind == "ties" or (self.kind == "consensus" and params.base_method == "ties")

    def tensor_stats(self, name, base, tensor, params):
        if self.needs_tensor_stats(params):
            return {"threshold": magnitude_threshold(tensor, params.density, base)}
        return {}

    def merge(self, name, base, inputs, per_input, params):
        if base is None:
            raise ParamError(f"{self.name} merges task vectors: it needs the base model")
        taus = task_vectors(base, inputs)
        if self.kind == "tall":
            total = torch.stack(taus).sum(0)
            lams = [float(v.get("lam", params.lam)) for v in per_input]
            masks = tall_masks(taus, total, lams)
            return {"merged": total.to(base.dtype), **{f"mask/{i}": m for i, m in enumerate(masks)}}
        weights = _weights(per_input)
        if self.kind == "task_arithmetic" or (self.kind == "consensus" and params.base_method == "task_arithmetic"):
            vector = torch.stack([w * t for w, t in zip(weights, taus)]).sum(0)
        else:
            thresholds = [v["threshold"] if "threshold" in v else magnitude_threshold(t, params.density)
                          for v, t in zip(per_input, taus)]
            vector = ties_vector([trim(t, thr) for t, thr in zip(taus, thresholds)], weights,
                                 "sum" if self.kind == "consensus" else "mean")
        if self.kind == "consensus":
            keep = consensus(tall_masks(taus, vector, [params.lam] * len(taus)), params.k)
            vector = torch.where(keep, vector, torch.zeros((), dtype=vector.dtype))
        return {"merged": (base.float() + params.scale * vector).to(base.dtype)}


@hookimpl
def llmgraft_register_mergers(register):
    register(TaskVectors("task_arithmetic", "Task arithmetic: base + lambda * sum of task vectors (baseline)",
                         TaskArithmeticParams, _WEIGHT))
    register(TaskVectors("ties", "TIES: trim, elect signs, disjoint mean of task vectors (Yadav et al., 2023)",
                         TiesParams, _WEIGHT))
    register(TaskVectors("tall", "TALL masks: a multi-task vector plus one bit mask per task (ICML 2024)",
                         TallParams, _LAM, outputs=("mask",), merged_is="task_vector"))
    register(TaskVectors("consensus", "Consensus: keep task-vector entries present in >= k TALL masks (ICML 2024)",
                         ConsensusParams, _WEIGHT))
