"""Top-W decoding (arXiv 2602.10346) as a ``sampler`` plugin: Wasserstein-regularised truncation.

Request fields: ``{"top_w": 2.8}`` (β, the primary parameter) and ``top_w_lam``, ``top_w_geom_scale``,
``top_w_top_m``, ``top_w_init_top_p``, ``top_w_alt_iters``, ``top_w_potential``. Needs the served model's
input embeddings, which the host integrations provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch

from ..hooks.families import Sampler
from ..hooks.params import Params, choice, param, per_row
from ..hooks.resources import ModelResources, check_vocab, require
from ..hooks.specs import hookimpl
from ..kernels.top_w import POTENTIALS, top_w, unit_embeddings


@dataclass(frozen=True)
class TopWParams(Params):
    owner = "top_w"
    aliases = {"lambda": "lam", "lam_fixed": "lam"}

    beta: float = per_row(2.8, range="[0, 100]",
                          help="mass reward: larger keeps more tokens (the objective's -beta log Gamma_S)")
    lam: float = per_row(2.2, range="[0, 100]", help="entropy weight lambda of the objective")
    geom_scale: float = per_row(0.6, range="[0, 100]",
                                help="weight of the embedding-geometry potential in the token score phi")
    init_top_p: float = per_row(0.999, range="(0, 1]", help="warm start: the top-p set of this mass")
    top_m: int = param(1200, range="[1, 1000000]", help="candidates considered: the m most likely tokens")
    alt_iters: int = param(9, range="[1, 100]", help="most alternating passes (stops early when S repeats)")
    potential: str = choice("nearest", POTENTIALS,
                            help="nearest: the official potential; matching: its uncalled alternative (slow)")


def unit_embeddings_of(model: ModelResources):
    """The model's standardised, row-normalised input embeddings, computed once per model."""
    return model.derived("top_w.unit_embeddings", lambda r: unit_embeddings(r.get("input_embeddings")))


class TopW(Sampler):
    """Keep the prefix, in order of a potential mixing log p and embedding distance to the kept set, that
    maximises a Wasserstein-regularised objective; alternate the set and the potential until it repeats."""

    name = "top_w"
    description = "Top-W: Wasserstein-regularised truncation over embedding geometry (arXiv 2602.10346)"
    params_cls = TopWParams
    primary = "beta"
    needs = ("input_embeddings",)

    def apply(self, logits: torch.Tensor, params: SimpleNamespace, model: ModelResources | None = None
              ) -> torch.Tensor:
        unit = unit_embeddings_of(require(model, self.name))
        check_vocab(unit, logits.shape[-1], model, self.name, "input embeddings")
        return top_w(logits, unit, params.lam, params.beta, params.geom_scale, params.top_m,
                     params.init_top_p, params.alt_iters, params.potential)


@hookimpl
def llmgraft_register_samplers(register):
    register(TopW())
