"""Token retention settings shared by every host: stages, the chosen method and KV manager, and the step
from a layer's queries and keys to the kept tokens. Host integrations (transformers, vLLM) only slice.

Settings, as the Python API, ``--additional-config`` and the CLI spell them::

    {"stages": [[layer, k or ratio], ...], "method": "prompt_distill", "params": {...},
     "kv_manager": "keep_kv", "kv_params": {...}}

A stage's keep is a count when it is an int and a ratio when it is a float, or explicit as
``{"layer": 1, "ratio": 0.25}`` / ``{"layer": 1, "count": 64}`` (JSON clients that write 1.0 as 1 need
this form). A ratio is a share of the tokens the stage sees (for a later stage, the earlier one's kept).
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ParamError
from .manager import get_registry

SETTINGS = ("stages", "method", "params", "kv_manager", "kv_params")
#: The key of these settings in vLLM's ``--additional-config '{"llmgraft": {...}}'``.
SETTINGS_KEY = "prompt_distill"


@dataclass(frozen=True)
class Stage:
    """Select at ``layer`` (0-based): keep ``keep`` tokens (an int count: besides the last prompt token for
    methods that always keep it) or that fraction of each row's prompt (a float ratio in (0, 1])."""

    layer: int
    keep: int | float


def parse_stages(stages: Any, num_layers: int) -> tuple[Stage, ...]:
    """Validated stages from ``[(layer, k or ratio), ...]`` (or ``[{"layer":, "keep":}]``): layers in
    [0, num_layers - 2] (a selection at the last layer would save nothing), strictly increasing; counts >= 1,
    ratios in (0, 1]."""
    if isinstance(stages, (str, bytes, Mapping)) or not hasattr(stages, "__iter__"):
        raise ParamError(f"stages must be a list of (layer, k or keep ratio) pairs, got {stages!r}")
    out: list[Stage] = []
    for item in stages:
        if isinstance(item, Mapping):
            kinds = [k for k in ("keep", "count", "ratio") if k in item]
            if set(item) - {"layer", "keep", "count", "ratio"} or "layer" not in item or len(kinds) != 1:
                raise ParamError(f"a stage has the key 'layer' and one of 'count', 'ratio' (or 'keep'), got "
                                 f"{sorted(item)}")
            keep = item[kinds[0]]
            if kinds[0] == "count" and isinstance(keep, numbers.Real) and not isinstance(keep, bool) and \
                    float(keep).is_integer():
                keep = int(keep)
            elif kinds[0] == "ratio" and isinstance(keep, numbers.Real) and not isinstance(keep, bool):
                keep = float(keep)
            item = (item["layer"], keep)
        if isinstance(item, (str, bytes)) or not hasattr(item, "__len__") or len(item) != 2:
            raise ParamError(f"a stage is a (layer, k or keep ratio) pair, got {item!r}")
        layer, keep = tuple(item)
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise ParamError(f"stage layer must be an int, got {layer!r}")
        layer = int(layer)
        if not 0 <= layer < num_layers - 1:
            raise ParamError(f"stage layer {layer} is out of range: selection layers are 0..{num_layers - 2} "
                             f"(the model has {num_layers} layers; the last one has no later layer to save)")
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
            raise ParamError(f"stage keep must be an int count or a float ratio, got {keep!r}")
        keep = int(keep) if isinstance(keep, numbers.Integral) else float(keep)
        if isinstance(keep, int) and keep < 1:
            raise ParamError(f"stage keep count must be >= 1, got {keep}")
        if isinstance(keep, float) and not 0.0 < keep <= 1.0:
            raise ParamError(f"stage keep ratio must be in (0, 1], got {keep}")
        if out and layer <= out[-1].layer:
            raise ParamError(f"stage layers must increase, got {out[-1].layer} then {layer}")
        out.append(Stage(layer, keep))
    if not out:
        raise ParamError("stages is empty: give at least one (layer, k or keep ratio)")
    return tuple(out)


class RetentionPlan:
    """A validated retention setting for a model of ``num_layers`` layers: its stages, the registered
    ``attention`` method and ``kv_manager`` with their parameters, and which layers each stage truncates."""

    def __init__(self, stages: Any, num_layers: int, method: str = "prompt_distill",
                 params: Mapping[str, Any] | None = None, kv_manager: str = "keep_kv",
                 kv_params: Mapping[str, Any] | None = None) -> None:
        registry = get_registry()
        self.method = registry.get("attention", method)
        self.params = self.method.params_cls.from_mapping(params or {})
        self.kv_manager = registry.get("kv_manager", kv_manager)
        self.kv_params = self.kv_manager.params_cls.from_mapping(kv_params or {})
        self.stages = parse_stages(stages, num_layers)
        self.restart = getattr(self.method, "mode", "continue") == "restart"
        self.keeps_last = getattr(self.method, "keeps_last", True)
        self.queries = getattr(self.method, "queries", 1)
        if self.restart and kv_manager != "keep_kv":
            raise ParamError(f"{method!r} reruns the model on its kept tokens, so every layer's KV already holds only "
                             f"them; kv_manager {kv_manager!r} has nothing to cut")
        if self.restart and len(self.stages) != 1:
            raise ParamError(f"{method!r} restarts from layer 0 on its kept tokens, so it takes one stage, "
                             f"got {len(self.stages)}")
        layers = tuple(s.layer for s in self.stages)
        self.truncate: dict[int, tuple[int, ...]] = {}
        for i, stage in enumerate(self.stages):
            cut = tuple(self.kv_manager.truncated_layers(layers, i, num_layers, self.kv_params))
            if any(not 0 <= j <= stage.layer for j in cut):
                raise ParamError(f"kv_manager {kv_manager!r} truncates layers {cut}, not all in 0..{stage.layer}")
            self.truncate[stage.layer] = cut
        self.at = {s.layer: s for s in self.stages}

    @classmethod
    def from_settings(cls, settings: Any, num_layers: int, where: str = "prompt_distill settings") -> RetentionPlan:
        """A plan from a settings mapping (keys :data:`SETTINGS`); unknown keys are an error."""
        if not isinstance(settings, Mapping):
            raise ParamError(f"{where} must be a mapping with 'stages', got {settings!r}")
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            raise ParamError(f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(SETTINGS)}")
        if "stages" not in settings:
            raise ParamError(f"{where} need 'stages', e.g. [[1, 0.25]]")
        return cls(settings["stages"], num_layers, method=settings.get("method", "prompt_distill"),
                   params=settings.get("params"), kv_manager=settings.get("kv_manager", "keep_kv"),
                   kv_params=settings.get("kv_params"))

    def select(self, layer: int, query, keys, valid):
        """The stage at ``layer`` on one batch: ``(indices, kept)`` from ``select_tokens`` (positions in the
        T tokens the layer sees), or None when its count covers every row's prompt (with a warning)."""
        from ..kernels.retention import keep_counts, select_tokens

        stage = self.at[layer]
        counts = keep_counts(valid, stage.keep, self.keeps_last)
        if isinstance(stage.keep, int) and bool((counts + int(self.keeps_last) == valid.sum(1)).all()):
            warnings.warn(f"token retention: the stage at layer {layer} keeps {stage.keep} tokens, every token it "
                          f"sees ({int(valid.sum(1).max())}); it selects nothing", stacklevel=3)
            return None
        count = min(self.queries, query.shape[2])
        scores = self.method.score(query[:, :, -count:], keys, valid, self.params)
        if tuple(scores.shape) != tuple(valid.shape):
            raise RuntimeError(f"attention {self.method.name!r} returned scores of shape {tuple(scores.shape)}, "
                               f"expected {tuple(valid.shape)}")
        return select_tokens(scores, valid, counts, self.keeps_last)
