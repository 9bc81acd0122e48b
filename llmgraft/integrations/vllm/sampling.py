"""``GraftSampling``: every registered llmgraft sampler, as one vLLM (V1 engine) logits processor.

Per request: ``SamplingParams(extra_args={"top_h": 0.4})`` or over HTTP ``"vllm_xargs": {"top_h": 0.4}``;
any sampler via ``{"llmgraft_sampler": name, "<name>_<param>": ...}``. Server-wide default:
``--additional-config '{"llmgraft": {"sampler": "top_h", "top_h": 0.4}}'``.

It is argmax-invariant, so vLLM runs it after the temperature and before top-k/top-p; the logits it sees
are already scaled and it never rescales them. Greedy requests are not tracked at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

    from ...hooks.sampling import SamplerChoice

_GREEDY_EPS = 1e-5  # vLLM's own threshold below which a request is sampled greedily


def _server_config(vllm_config: VllmConfig) -> Mapping[str, Any] | None:
    extra = getattr(vllm_config, "additional_config", None) or {}
    return extra.get("llmgraft") if isinstance(extra, Mapping) else None


class GraftSampling(LogitsProcessor):
    """Routes each request's rows to its llmgraft sampler, batching rows that share static parameters."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Front-end check at admission; a ``ValueError`` here becomes HTTP 400."""
        if sampling_params.extra_args:
            from ...hooks.sampling import parse_sampler_fields

            parse_sampler_fields(sampling_params.extra_args)

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        from ...hooks.sampling import parse_server_defaults

        self.device = device
        self.default = parse_server_defaults(_server_config(vllm_config))  # bad config fails at start-up
        self.rows: dict[int, SamplerChoice] = {}
        self.groups: list[tuple[Any, torch.Tensor | None, Any]] = []

    def is_argmax_invariant(self) -> bool:
        return True

    def _new_state(self, params: SamplingParams, _prompt: Any, _output: Any) -> SamplerChoice | None:
        if params is None or params.temperature < _GREEDY_EPS:
            return None
        from ...hooks.sampling import resolve_sampler

        return resolve_sampler(params.extra_args, self.default)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        process_dict_updates(self.rows, batch_update, self._new_state)
        self._regroup(batch_update.batch_size)

    def _regroup(self, batch_size: int) -> None:
        """Precompute, once per batch change, each group's row indices and stacked parameters."""
        by_key: dict[tuple, list[int]] = {}
        for index in sorted(self.rows):
            by_key.setdefault(self.rows[index].group_key(), []).append(index)
        self.groups = []
        for indices in by_key.values():
            choice = self.rows[indices[0]]
            params = choice.params.stack([self.rows[i].params for i in indices], device=self.device)
            whole = indices == list(range(batch_size))
            index = None if whole else torch.tensor(indices, dtype=torch.long, device=self.device)
            self.groups.append((choice.sampler, index, params))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.groups:
            return logits
        for sampler, index, params in self.groups:
            if index is None:
                logits = sampler.apply(logits, params)
            else:
                logits[index] = sampler.apply(logits[index], params)
        return logits
