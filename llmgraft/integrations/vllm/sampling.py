"""``GraftSampling``: every registered llmgraft sampler, as one vLLM logits processor.

Per request: ``SamplingParams(extra_args={"top_h": 0.4})`` or over HTTP ``"vllm_xargs": {"top_h": 0.4}``;
any sampler via ``{"llmgraft_sampler": name, "<name>_<param>": ...}``. Server-wide default:
``--additional-config '{"llmgraft": {"sampler": "top_h", "top_h": 0.4}}'``.

vLLM has two logits-processor interfaces and loads the same entry point into both, so the class subclasses
both and ``GraftSampling(...)`` builds the implementation matching the constructor vLLM calls:

* V1 engine model runner (the CPU default): an argmax-invariant processor. vLLM runs it after the
  temperature and before top-k/top-p, so it sees scaled logits and never rescales them.
* Model Runner V2 (the GPU default in vLLM 0.32): ``apply`` runs *before* the temperature, so each row is
  scaled by its request's temperature, filtered, and scaled back; vLLM's later division then samples from
  exactly ``sampler(logits / T)``.

Greedy requests are never touched, and ``apply`` returns at once when no row in the batch uses llmgraft.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor import BatchUpdate
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ...kernels import native

try:  # Model Runner V2 interface (vLLM >= 0.32); import-light by design upstream.
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2LogitsProcessor
except ImportError:  # pragma: no cover - older vLLM
    V2LogitsProcessor = None

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

    from ...hooks.resources import ModelResources
    from ...hooks.sampling import SamplerChoice

_GREEDY_EPS = 1e-5  # vLLM's own threshold below which a request is sampled greedily
_BASES = (V1LogitsProcessor,) if V2LogitsProcessor is None else (V1LogitsProcessor, V2LogitsProcessor)


def _server_default(vllm_config: VllmConfig) -> SamplerChoice | None:
    """The ``llmgraft`` section of ``--additional-config``, validated (a bad one fails engine start-up,
    with its reason repeated as the last line of the server's output)."""
    from ...hooks.errors import LLMGraftError
    from ...hooks.sampling import parse_server_defaults
    from .startup import report

    extra = getattr(vllm_config, "additional_config", None) or {}
    try:
        section = extra.get("llmgraft") if isinstance(extra, Mapping) else None
        _check_retention_architecture(section, vllm_config)
        return parse_server_defaults(section)
    except LLMGraftError as exc:
        report(f"invalid --additional-config 'llmgraft' section: {exc}")
        raise


def _check_retention_architecture(section: Any, vllm_config: VllmConfig) -> None:
    """Token-retention settings do nothing unless the model class is one of llmgraft's: say so at start-up."""
    from ...hooks.errors import ParamError
    from ...hooks.retention import SETTINGS_KEY
    from .models import RETENTION_ARCHITECTURES

    if not isinstance(section, Mapping) or SETTINGS_KEY not in section:
        return
    model_config = getattr(vllm_config, "model_config", None)
    architectures = list(getattr(getattr(model_config, "hf_config", None), "architectures", None) or [])
    if set(architectures) & set(RETENTION_ARCHITECTURES):
        return
    ours = [f"Llmgraft{a}" for a in architectures if f"Llmgraft{a}" in RETENTION_ARCHITECTURES]
    if not ours:
        raise ParamError(f"'{SETTINGS_KEY}' supports {', '.join(RETENTION_ARCHITECTURES)} (Llama, Qwen2 and "
                         f"Mistral decoders); this model runs {architectures}")
    raise ParamError(f"'{SETTINGS_KEY}' needs llmgraft's model class: add --hf-overrides "
                     f"'{{\"architectures\": [\"{ours[0]}\"]}}'; this model runs {architectures}")


def _choice_for(params: SamplingParams | None, default: SamplerChoice | None) -> SamplerChoice | None:
    if params is None or params.temperature < _GREEDY_EPS:
        return None
    from ...hooks.sampling import resolve_sampler

    return resolve_sampler(params.extra_args, default)


@dataclass(frozen=True)
class _Group:
    """Rows of one batch that share a sampler and its static parameters."""

    sampler: Any
    index: torch.Tensor | None  # row indices; None when the group is the whole batch in order
    params: Any                 # Params.stack(...) result
    temperature: torch.Tensor | None = None  # [rows, 1], V2 only (logits arrive unscaled)


def _group_rows(choices: Sequence[SamplerChoice | None], device, temperatures: Sequence[float] | None = None
                ) -> list[_Group]:
    """Group rows (``choices[i]`` for row i, None = untouched) and stack their parameters."""
    by_key: dict[tuple, list[int]] = {}
    for row, choice in enumerate(choices):
        if choice is not None:
            by_key.setdefault(choice.group_key(), []).append(row)
    groups = []
    for rows in by_key.values():
        first = choices[rows[0]]
        params = first.params.stack([choices[r].params for r in rows], device=device)
        index = None if len(rows) == len(choices) else torch.tensor(rows, dtype=torch.long, device=device)
        temperature = None
        if temperatures is not None:
            temperature = torch.tensor([temperatures[r] for r in rows], device=device).unsqueeze(1)
        groups.append(_Group(first.sampler, index, params, temperature))
    return groups


def _engine_resources(vllm_config: VllmConfig, default: SamplerChoice | None) -> ModelResources:
    """The model tensors samplers may need (Top-W: input embeddings), checked once at engine start.

    Unusable ones stop the engine when the server's default sampler needs them, and are logged otherwise;
    requests for such a sampler are then sampled without it, with an error logged once (failing inside the
    engine would end every request in flight, and admission runs where the model is not known)."""
    import logging

    from ...hooks import get_registry
    from ...hooks.families import needs_of
    from ...hooks.resources import ResourceError
    from .resources import engine_resources
    from .startup import report

    resources, problem = engine_resources(vllm_config)
    if problem:
        needing = [n for n in get_registry().names("sampler") if needs_of(get_registry().get("sampler", n))]
        if default is not None and needs_of(default.sampler):
            report(f"the server's default sampler {default.sampler.name!r} cannot run: {problem}")
            raise ResourceError(problem)
        if needing:
            logging.getLogger("llmgraft").warning("llmgraft: %s unavailable on this engine: %s",
                                                  ", ".join(needing), problem)
    return resources


_UNAVAILABLE_REPORTED: set[tuple[int, str]] = set()


def _unavailable(resources: ModelResources, sampler, exc: Exception) -> None:
    """Log, once per engine and sampler, that a sampler's rows run unfiltered: its model tensors are missing.

    Raising here would kill the engine and every request in flight; the engine's start-up already warned."""
    import logging

    key = (id(resources), sampler.name)
    if key not in _UNAVAILABLE_REPORTED:
        _UNAVAILABLE_REPORTED.add(key)
        logging.getLogger("llmgraft").error(
            "llmgraft: %s cannot run on this engine (%s); its requests are sampled without it", sampler.name, exc)


def _apply_groups(logits: torch.Tensor, groups: list[_Group], resources: ModelResources) -> torch.Tensor:
    from ...hooks.families import needs_of
    from ...hooks.resources import ResourceError

    for g in groups:
        rows = logits if g.index is None else logits[g.index]
        extra = (resources,) if needs_of(g.sampler) else ()
        if extra:
            try:
                for name in needs_of(g.sampler):
                    resources.get(name)
            except ResourceError as exc:
                _unavailable(resources, g.sampler, exc)
                continue
        if g.temperature is not None:  # V2: filter sampler(rows / T), then restore vLLM's unscaled view
            rows = g.sampler.apply(rows / g.temperature, g.params, *extra).mul_(g.temperature)
        else:
            rows = g.sampler.apply(rows, g.params, *extra)
        if g.index is None:
            logits = rows
        else:
            logits[g.index] = rows
    return logits


class GraftSampling(*_BASES):
    """Routes each request's rows to its llmgraft sampler, batching rows that share static parameters."""

    def __new__(cls, vllm_config: VllmConfig, *args, **kwargs):
        if cls is GraftSampling:
            v1 = bool(args) and isinstance(args[0], (torch.device, str))
            cls = _V1GraftSampling if v1 or V2LogitsProcessor is None else _V2GraftSampling
        return super().__new__(cls)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Front-end check at admission; a ``ValueError`` here becomes HTTP 400."""
        if sampling_params.extra_args:
            from ...hooks.sampling import parse_sampler_fields

            parse_sampler_fields(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return True  # every llmgraft sampler keeps each row's argmax token

    def update_state(self, batch_update: BatchUpdate | None) -> None:  # V1 only; V2 uses add_request
        raise NotImplementedError

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        raise NotImplementedError


class _V1GraftSampling(GraftSampling):
    """V1 interface: batch indices from ``update_state``; groups rebuilt only when the batch changes."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.device = device
        self.default = _server_default(vllm_config)
        self.resources = _engine_resources(vllm_config, self.default)
        native.prepare()
        self.rows: dict[int, SamplerChoice] = {}
        self.groups: list[_Group] = []

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        process_dict_updates(self.rows, batch_update, lambda params, _p, _o: _choice_for(params, self.default))
        if not self.rows:  # batches without llmgraft requests cost nothing beyond the dict update
            self.groups = []
            return
        self.groups = _group_rows([self.rows.get(i) for i in range(batch_update.batch_size)], self.device)

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return _apply_groups(logits, self.groups, self.resources) if self.groups else logits


class _V2GraftSampling(GraftSampling):
    """Model Runner V2 interface: per-slot state from ``add_request``; rows map to slots every step."""

    def __init__(self, vllm_config: VllmConfig, req_states: Any) -> None:
        max_reqs = getattr(req_states, "max_num_reqs", None) or vllm_config.scheduler_config.max_num_seqs
        self.device = getattr(req_states, "device", None) or torch.device("cpu")
        self.default = _server_default(vllm_config)
        self.resources = _engine_resources(vllm_config, self.default)
        native.prepare()
        self.slots: dict[int, SamplerChoice] = {}
        self.temperature = np.ones(max_reqs, dtype=np.float32)
        self.uses = np.zeros(max_reqs, dtype=bool)
        self._cache: tuple[bytes, list[_Group]] | None = None

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        choice = _choice_for(sampling_params, self.default)
        self._cache = None
        self.uses[req_idx] = choice is not None
        if choice is None:
            self.slots.pop(req_idx, None)
            return False
        self.slots[req_idx] = choice
        self.temperature[req_idx] = sampling_params.temperature
        return True

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        slots = ctx.idx_mapping_np
        if len(slots) != logits.shape[0]:  # speculative rows: one per draft token
            slots = ctx.expanded_idx_mapping.cpu().numpy()
        if not self.uses[slots].any():
            return logits
        key = slots.tobytes()
        if self._cache is None or self._cache[0] != key:
            choices = [self.slots.get(int(s)) if self.uses[s] else None for s in slots]
            self._cache = (key, _group_rows(choices, self.device, self.temperature[slots].tolist()))
        return _apply_groups(logits, self._cache[1], self.resources)
