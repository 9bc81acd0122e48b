"""transformers integration: any registered llmgraft sampler as a ``LogitsProcessor`` for ``generate``.

    proc = GraftLogitsProcessor("top_h", temperature=0.8, alpha=0.4)
    model.generate(**inputs, do_sample=True, temperature=0.8, logits_processor=[proc])

Samplers that need the model's tensors (Top-W: its input embeddings) take the model too:
``GraftLogitsProcessor("top_w", model=model, temperature=0.8)``.

``generate`` runs custom processors *before* its temperature warper, while llmgraft samplers are defined
on temperature-scaled logits. So the processor scales by the same ``temperature`` you pass to ``generate``,
applies the sampler, and scales back; the warper then divides again and sampling sees exactly
``sampler(logits / T)``.
"""

from __future__ import annotations

import torch
from transformers import LogitsProcessor

from ...hooks import ParamError
from ...hooks.families import needs_of
from ...hooks.resources import ModelResources
from ...hooks.sampling import OPT_OUT, SAMPLER_KEY, parse_own_fields
from ...kernels import native


class GraftLogitsProcessor(LogitsProcessor):
    """Wraps the llmgraft sampler ``sampler`` (a registered name) with fixed parameters for all rows.

    Parameters are keywords, spelt as request fields are: by name (``alpha=0.4``), by the sampler's
    shorthand (``top_h=0.4``) or prefixed (``top_h_variant="hf"``); an unknown keyword is an error.
    ``model`` (a ``PreTrainedModel``) is required by samplers that need the model's tensors.
    """

    def __init__(self, sampler: str = "top_h", *, temperature: float = 1.0, model=None, **params) -> None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ParamError(f"temperature must be a positive number, got {temperature!r}")
        if not isinstance(sampler, str) or sampler == OPT_OUT:
            raise ParamError(f"sampler must be the name of a registered sampler, got {sampler!r}")
        choice = parse_own_fields({SAMPLER_KEY: sampler, **params}, "keyword argument")
        self.sampler, self.params = choice.sampler, choice.params
        self.temperature = float(temperature)
        self.resources = None
        if needs_of(self.sampler):
            if model is None or not hasattr(model, "get_input_embeddings"):
                raise ParamError(f"sampler {sampler!r} needs the model's {', '.join(needs_of(self.sampler))}: pass "
                                 f"model=<your PreTrainedModel>, e.g. GraftLogitsProcessor({sampler!r}, model=model)")
            self.resources = ModelResources({"input_embeddings": lambda: model.get_input_embeddings().weight},
                                            where=f"model {type(model).__name__}")
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            rows = self.resources.get("input_embeddings").shape[0]
            if head is not None and getattr(head, "weight", None) is not None and head.weight.shape[0] != rows:
                raise ParamError(f"sampler {sampler!r}: the model's input embeddings have {rows} rows but its output "
                                 f"layer scores {head.weight.shape[0]} tokens; they must cover the same vocabulary")
        self._stacked: dict[tuple[int, torch.device], object] = {}
        native.prepare()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        key = (scores.shape[0], scores.device)
        if key not in self._stacked:
            self._stacked[key] = self.params.stack([self.params] * scores.shape[0], device=scores.device)
        scaled = scores / self.temperature
        extra = (self.resources,) if self.resources is not None else ()
        return self.sampler.apply(scaled, self._stacked[key], *extra).mul_(self.temperature)


def _register_quantizers() -> None:
    # llmgraft-quantized checkpoints load with from_pretrained once this module is imported.
    from .quantizer import register_schemes

    register_schemes()


_register_quantizers()

__all__ = ["GraftLogitsProcessor"]
