"""Tensors of the served model that a method may need besides its inputs (Top-W: the input embeddings).

A method lists what it needs by name (``Sampler.needs``); each host integration builds one
:class:`ModelResources` per engine or model, whose loaders read the tensors on first use. Values derived
from them (Top-W's standardised embeddings) are cached there too, so they are computed once per model.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from .errors import LLMGraftError

#: Every resource a host may provide, with what it is.
RESOURCES: dict[str, str] = {
    "input_embeddings": "the model's input-embedding matrix, [vocab, hidden] (token id -> vector)",
}


class ResourceError(LLMGraftError):
    """A method needs a tensor of the model that the host cannot provide (missing, or of the wrong shape)."""


class ModelResources:
    """The served model's resources, loaded lazily and cached; ``where`` names the model in errors."""

    def __init__(self, loaders: Mapping[str, Callable[[], Any]], where: str = "the model") -> None:
        unknown = sorted(set(loaders) - set(RESOURCES))
        if unknown:
            raise ValueError(f"unknown resources {unknown}; known: {sorted(RESOURCES)}")
        self.loaders = dict(loaders)
        self.where = where
        self._values: dict[str, Any] = {}
        self._lock = threading.RLock()  # derived values load resources inside

    def get(self, name: str) -> Any:
        """The resource ``name``, loaded on first use."""
        return self.derived(name, lambda _resources: self._load(name))

    def derived(self, key: str, compute: Callable[[ModelResources], Any]) -> Any:
        """``compute(self)``, computed once per model and cached under ``key``."""
        value = self._values.get(key)
        if value is None:
            with self._lock:
                value = self._values.get(key)
                if value is None:
                    value = self._values[key] = compute(self)
        return value

    def _load(self, name: str) -> Any:
        loader = self.loaders.get(name)
        if loader is None:
            raise ResourceError(f"{self.where} provides no {name} ({RESOURCES.get(name, 'unknown resource')})")
        return loader()


def require(resources: ModelResources | None, method: str) -> ModelResources:
    """``resources``, or a clear error when the host gave a method that needs the model none."""
    if resources is None:
        raise ResourceError(f"{method} needs the model's tensors: pass the model "
                            f"(transformers: GraftLogitsProcessor({method!r}, model=model))")
    return resources


def check_vocab(matrix: Any, vocab: int, resources: ModelResources, method: str, name: str) -> None:
    """A clear error unless ``matrix`` (derived from resource ``name``) has one row per logits column."""
    if matrix.dim() != 2 or matrix.shape[0] != vocab:
        raise ResourceError(f"{method}: the {name} of {resources.where} have shape {tuple(matrix.shape)} but "
                            f"the logits have {vocab} columns; they must cover the same vocabulary")
