"""Token retention: PromptDistill, GemFilter and a last-k window (``attention``), and what happens to the
earlier layers' cached KV (``kv_manager``: keep it whole, or cut it to the kept tokens).

Both scoring rules follow the official code (declare-lab/PromptDistill ``models/llama.py``;
SalesforceAIResearch/GemFilter ``gem_filter_utils.py``), which differ in four details:

=====================  ======================================  ======================================
                       PromptDistill                           GemFilter
=====================  ======================================  ======================================
per-head score         q_last · k / sqrt(d)                    q_last · k (no scaling)
over heads             mean                                    sum
last token             score zeroed before pooling; always     pooled like the rest; competes in the
                       kept, k counts the others               top-k, k counts every kept token
then                   layers after L see only the kept        the model reruns from layer 0 on the kept
                       tokens, at their original positions     tokens as a new prompt, positions 0..k-1
=====================  ======================================  ======================================

Neither applies a softmax; both average-pool the scores (kernel 5, padding 2, zeros counted). Padding
positions score 0 before pooling, which is what a row alone sees beyond its first token, so batches with
left padding select what each row would alone (the official harnesses run batch 1). We score in float32;
the official runs score in bf16/fp16, so near-ties may break differently.

Only the scores live here; selection, ordering and padding are ``llmgraft.kernels.retention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Attention, KVManager, ParamError, Params, hookimpl, param
from ..kernels.retention import last_query_logits, last_valid, pool_scores


@dataclass(frozen=True)
class PromptDistillParams(Params):
    owner = "prompt_distill"
    pool: int = param(5, range="[1, inf)", help="average-pooling kernel over the scores: odd, 1 turns pooling "
                      "off (the official default 5)")

    def validate(self) -> None:
        if self.pool % 2 == 0:
            raise ParamError(f"{self.owner}: pool must be odd (padding pool // 2 keeps the length), got {self.pool}")


@dataclass(frozen=True)
class GemFilterParams(PromptDistillParams):
    owner = "gemfilter"


@dataclass(frozen=True)
class LastKParams(Params):
    owner = "last_k"


@dataclass(frozen=True)
class KeepKVParams(Params):
    owner = "keep_kv"


class PromptDistill(Attention):
    name = "prompt_distill"
    description = "PromptDistill: later layers keep the top-k prompt tokens by pooled last-token attention"
    params_cls = PromptDistillParams
    mode = "continue"
    keeps_last = True

    def score(self, query, keys, valid, params):
        dots = last_query_logits(query[:, :, -1:], keys)[:, :, 0]            # [B, H, T]
        scores = dots.mean(1) / keys.shape[-1] ** 0.5
        rows = torch.arange(len(scores), device=scores.device)
        scores[rows, last_valid(valid)] = 0.0                                 # the last token is zeroed
        return pool_scores(scores, valid, params.pool)


class GemFilter(Attention):
    name = "gemfilter"
    description = "GemFilter: rerun the model on the top-k prompt tokens by pooled last-token attention"
    params_cls = GemFilterParams
    mode = "restart"
    keeps_last = False

    def score(self, query, keys, valid, params):
        dots = last_query_logits(query[:, :, -1:], keys)[:, :, 0]            # [B, H, T]
        return pool_scores(dots.sum(1), valid, params.pool)


class LastK(Attention):
    name = "last_k"
    description = "keep the k most recent prompt tokens (a window that reads no attention)"
    params_cls = LastKParams
    mode = "continue"

    def score(self, query, keys, valid, params):
        return torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32).expand(valid.shape)


@dataclass(frozen=True)
class TruncateParams(Params):
    owner = "truncate_kv"
    stages: int | None = param(None, range="[1, inf)", help="how many of the first stages cut the KV of the "
                               "layers up to them (the paper's cache_truncation_end); None: every stage")


class KeepKV(KVManager):
    name = "keep_kv"
    description = "layers up to a selection keep their full prompt KV (PromptDistill's default)"
    params_cls = KeepKVParams

    def truncated_layers(self, stage_layers, stage, num_layers, params):
        return ()


class TruncateKV(KVManager):
    name = "truncate_kv"
    description = "cut each stage's earlier layers' prompt KV to its kept tokens (PromptDistill's cache truncation)"
    params_cls = TruncateParams

    def truncated_layers(self, stage_layers, stage, num_layers, params):
        # As the official code: stage i cuts the layers after the previous stage's layer, up to its own.
        if params.stages is not None and stage >= params.stages:
            return ()
        first = stage_layers[stage - 1] + 1 if stage else 0
        return tuple(range(first, stage_layers[stage] + 1))


@hookimpl
def llmgraft_register_attention(register):
    register(PromptDistill())
    register(GemFilter())
    register(LastK())


@hookimpl
def llmgraft_register_kv_managers(register):
    register(KeepKV())
    register(TruncateKV())
