"""p-less decoding (Tan et al., ICLR 2026) as a ``sampler`` plugin: keep p ≥ Σ p², no tuning knob.

Request fields: ``{"p_less": 2}`` (the order k, primary; 2 is the paper's p-less) or
``{"llmgraft_sampler": "p_less"}``, and ``p_less_variant`` (p_less | p_less_norm).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..hooks.errors import ParamError
from ..hooks.families import Sampler
from ..hooks.params import Params, choice, param
from ..hooks.specs import hookimpl
from ..kernels.thresholds import P_LESS_VARIANTS, p_less


@dataclass(frozen=True)
class PLessParams(Params):
    owner = "p_less"

    order: float = param(2.0, range="(1, 100]",
                         help="k: keep p >= (sum p^k)^(1/(k-1)); 2 is p-less's sum of squared probabilities")
    variant: str = choice("p_less", P_LESS_VARIANTS,
                          help="p_less: threshold sum p^2; p_less_norm: (V sum p^2 - 1)/(V - 1), order 2 only")

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ParamError as exc:
            if self.order is True or self.order == 1:  # {"p_less": true} (HTTP turns true into 1)
                raise ParamError(f"{exc}; to turn p-less on with its defaults, send "
                                 '{"llmgraft_sampler": "p_less"} (the shorthand {"p_less": k} sets the order k)'
                                 ) from None
            raise

    def validate(self) -> None:
        if self.variant == "p_less_norm" and self.order != 2.0:
            raise ParamError(f"p_less: variant 'p_less_norm' is defined for order 2 only, got order={self.order}")


class PLess(Sampler):
    """Keep the tokens at least as likely as the chance that two draws agree (Σ p²): no hyperparameter."""

    name = "p_less"
    description = "p-less: keep p >= sum of p^2, hyperparameter-free (Tan et al., ICLR 2026)"
    params_cls = PLessParams
    primary = "order"

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor:
        return p_less(logits, params.variant, params.order)


@hookimpl
def llmgraft_register_samplers(register):
    register(PLess())
