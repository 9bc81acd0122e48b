"""Top-H decoding (arXiv 2509.02510) as a ``sampler`` plugin.

Request fields: ``{"top_h": 0.4}`` (alpha), ``top_h_variant`` (reference | hf | paper), ``top_h_top_n``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..hooks.families import Sampler
from ..hooks.params import Params, choice, param, per_row
from ..hooks.specs import hookimpl
from ..kernels.top_h import VARIANTS, top_h


@dataclass(frozen=True)
class TopHParams(Params):
    owner = "top_h"

    alpha: float = per_row(0.4, range="(0, 1]",
                           help="entropy budget: the kept set's entropy stays within alpha times the bound")
    top_n: int = param(100, range="[1, 1000000]", help="candidates considered: the N most likely tokens")
    variant: str = choice("reference", VARIANTS,
                          help="reference: official code; hf: transformers' warper; paper: the stated bound")


class TopH(Sampler):
    """Keep the largest prefix of likely tokens whose cumulative entropy stays under α × a bound."""

    name = "top_h"
    description = "Top-H: entropy-bounded truncation (arXiv 2509.02510)"
    params_cls = TopHParams
    primary = "alpha"

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor:
        return top_h(logits, params.alpha, params.top_n, params.variant)


@hookimpl
def llmgraft_register_samplers(register):
    register(TopH())
