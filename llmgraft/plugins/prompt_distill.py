"""Token retention: PromptDistill, GemFilter and a last-k window (``attention``), and what happens to the
earlier layers' cached KV (``kv_manager``: keep it, or cut it to the kept tokens).

* **PromptDistill** (official ``models/llama.py``): at the selection layer, the RoPE'd query of the last
  prompt token against every key, divided by sqrt(d) and averaged over the query heads before the softmax,
  then average-pooled (kernel 5, padding 2); the top-k tokens plus the last one go on through the later
  layers, in their original order and with their original positions (mode "continue").
* **GemFilter** (official ``my_baseline/GemFilter``): the same last-token attention at its filter layer,
  softmaxed per head and summed over heads; the kept tokens become a new prompt that the model reruns from
  layer 0, positions renumbered from 0 (mode "restart").
* **last_k**: the k most recent prompt tokens, a baseline that reads no attention.

Only the scores live here; selection, ordering and padding are ``llmgraft.kernels.retention``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..hooks import Attention, KVManager, Params, hookimpl, param
from ..kernels.retention import last_query_logits


@dataclass(frozen=True)
class PromptDistillParams(Params):
    owner = "prompt_distill"
    pool: int = param(5, range="[1, inf)", help="average-pooling kernel over the scores (odd; the official 5)")

    def validate(self) -> None:
        if self.pool % 2 == 0:
            from ..hooks import ParamError

            raise ParamError(f"prompt_distill: pool must be odd (padding pool // 2 keeps the length), got {self.pool}")


@dataclass(frozen=True)
class NoParams(Params):
    owner = "token retention"


def masked_softmax(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension with padding positions excluded (exp(-inf) = 0)."""
    shape = [valid.shape[0]] + [1] * (logits.dim() - 2) + [valid.shape[1]]
    return logits.masked_fill(~valid.view(shape), float("-inf")).softmax(-1)


class PromptDistill(Attention):
    name = "prompt_distill"
    description = "PromptDistill: last-token attention averaged over heads, pooled; later layers keep the top-k"
    params_cls = PromptDistillParams
    mode = "continue"

    def score(self, query, keys, valid, params):
        logits = last_query_logits(query[:, :, -1:], keys)[:, :, 0]          # [B, H, T]
        weights = masked_softmax(logits.mean(1), valid)                       # mean over heads, then softmax
        pad = params.pool // 2
        return torch.nn.functional.avg_pool1d(weights[:, None], params.pool, stride=1, padding=pad)[:, 0]


class GemFilter(Attention):
    name = "gemfilter"
    description = "GemFilter: last-token attention summed over heads at a filter layer; rerun on the top-k"
    params_cls = NoParams
    mode = "restart"

    def score(self, query, keys, valid, params):
        logits = last_query_logits(query[:, :, -1:], keys)[:, :, 0]          # [B, H, T]
        return masked_softmax(logits, valid).sum(1)


class LastK(Attention):
    name = "last_k"
    description = "keep the k most recent prompt tokens (a window that reads no attention)"
    params_cls = NoParams
    mode = "continue"

    def score(self, query, keys, valid, params):
        return torch.arange(valid.shape[1], device=valid.device, dtype=torch.float32).expand(valid.shape)


@dataclass(frozen=True)
class TruncateParams(Params):
    owner = "truncate_kv"
    start: int = param(0, range="[0, inf)", help="first layer whose prompt KV is cut to the kept tokens")
    end: int | None = param(None, range="[0, inf)", help="one past the last layer cut (the paper's "
                            "cache_truncation_end); None: up to and including the selection layer")


class KeepKV(KVManager):
    name = "keep_kv"
    description = "layers up to a selection keep their full prompt KV (PromptDistill's default)"
    params_cls = NoParams

    def truncated_layers(self, stage_layer, num_layers, params):
        return ()


class TruncateKV(KVManager):
    name = "truncate_kv"
    description = "cut the prompt KV of layers start..end-1 (up to the selection) to the kept tokens"
    params_cls = TruncateParams

    def truncated_layers(self, stage_layer, num_layers, params):
        end = stage_layer + 1 if params.end is None else min(params.end, stage_layer + 1)
        return tuple(range(min(params.start, end), end))


@hookimpl
def llmgraft_register_attention(register):
    register(PromptDistill())
    register(GemFilter())
    register(LastK())


@hookimpl
def llmgraft_register_kv_managers(register):
    register(KeepKV())
    register(TruncateKV())
