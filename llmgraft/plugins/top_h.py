"""Top-H decoding (arXiv 2509.02510) as a ``sampler`` plugin.

Request fields: ``{"top_h": 0.4}`` (alpha), ``top_h_variant`` (reference | hf | paper), ``top_h_top_n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..hooks.errors import ParamError
from ..hooks.params import Params, choice, per_row
from ..hooks.specs import hookimpl
from ..kernels.top_h import VARIANTS, top_h


@dataclass(frozen=True)
class TopHParams(Params):
    owner = "top_h"

    alpha: float = per_row(0.4)
    top_n: int = 100
    variant: str = choice("reference", VARIANTS)

    def validate(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ParamError(f"top_h: alpha must be in (0, 1], got {self.alpha}")
        if not 1 <= self.top_n <= 1_000_000:
            raise ParamError(f"top_h: top_n must be a positive integer, got {self.top_n}")


class TopH:
    """Keep the largest prefix of likely tokens whose cumulative entropy stays under α × a bound."""

    name = "top_h"
    description = "Top-H: entropy-bounded truncation (arXiv 2509.02510); variants reference|hf|paper"
    params_cls = TopHParams
    primary = "alpha"

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor:
        return top_h(logits, params.alpha, params.top_n, params.variant)


@hookimpl
def llmgraft_register_samplers(register):
    register(TopH())
