"""top-nσ decoding (Tang et al., ACL 2025) as a ``sampler`` plugin: keep logits ≥ max − n·σ.

Request fields: ``{"top_nsigma": 1.0}`` (n) and ``top_nsigma_ddof``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..hooks.families import Sampler
from ..hooks.params import Params, param, per_row
from ..hooks.specs import hookimpl
from ..kernels.thresholds import top_nsigma


@dataclass(frozen=True)
class TopNSigmaParams(Params):
    owner = "top_nsigma"
    aliases = {"nsigma": "n", "sigma": "n"}

    n: float = per_row(1.0, range="[0, 100]", help="keep logits within n standard deviations of the maximum")
    ddof: int = param(1, range="[0, 1]", help="1: the official unbiased sigma (torch.std); 0: llama.cpp's "
                                              "population sigma")


class TopNSigma(Sampler):
    """Keep the tokens whose logit is within n standard deviations (of the row's logits) of the maximum."""

    name = "top_nsigma"
    description = "top-nsigma: keep logits >= max - n*sigma (Tang et al., ACL 2025)"
    params_cls = TopNSigmaParams
    primary = "n"

    def apply(self, logits: torch.Tensor, params: SimpleNamespace) -> torch.Tensor:
        return top_nsigma(logits, params.n, params.ddof)


@hookimpl
def llmgraft_register_samplers(register):
    register(TopNSigma())
