"""Token retention (PromptDistill, GemFilter, last-k, any registered ``attention`` method) in stock
transformers decoders, with no forked modeling code::

    with llmgraft.prompt_distill(model, stages=[(1, 0.25)]):
        model.generate(**inputs)

How it is wired, through hook points transformers provides:

* an ``AttentionInterface`` function (``llmgraft_<sdpa|eager>``) wraps the model's own attention and, at a
  selection layer during the prefill, hands the layer's RoPE'd queries and keys to the method's ``score``;
  its ``AttentionMaskInterface`` twin builds the model's usual mask (without it the mask is silently None),
  sized to the whole token history even when the cache of layer 0 holds fewer tokens;
* a forward hook on the selection layer slices its output hidden states to the kept tokens
  (mode "continue"), and forward pre-hooks (``with_kwargs=True``) on the later layers slice the rotary
  cos/sin, the position ids and the mask to them, so the kept tokens keep their original positions;
* a pre-hook on the base model starts a prompt's state at each prefill and, for mode "restart"
  (GemFilter), runs the layers up to the selection layer once, then feeds the kept tokens as the prompt,
  renumbering positions from 0 and shifting the decode positions to match.

Decoding continues at the original positions (prompt length + step) in mode "continue". Later layers'
caches hold only the kept tokens; a ``kv_manager`` may cut earlier layers' caches too.
Supported: Llama, Mistral and Qwen2-family decoders.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from transformers import DynamicCache

from ...hooks import ParamError
from ...hooks.retention import RetentionPlan
from ...kernels.retention import gather_tokens

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_BASES = ("sdpa", "eager")


class _Stop(Exception):
    """Ends the probe pass of a "restart" method once its selection layer has scored."""


def _refuse_labels(module, args, kwargs):
    if kwargs.get("labels") is not None:
        raise ParamError("token retention returns logits for the kept tokens only, so a loss over labels is "
                         "undefined inside the block; compute it outside")


@dataclass
class _Prompt:
    """State of one prompt's retention, from its prefill to the end of its decoding."""

    length: int                            # T: the prompt's padded length
    valid: torch.Tensor                    # [B, T] False on padding
    seen: int = 0                          # tokens of the history so far (prompt and generated)
    prefill: bool = True
    rows: torch.Tensor | None = None       # [B, K] original indices of the current hidden rows (None: all)
    cols: dict[int, torch.Tensor | None] = field(default_factory=dict)  # per layer: prompt tokens it caches
    kept: list[torch.Tensor] = field(default_factory=list)              # per stage: [B, K] kept indices
    pending: torch.Tensor | None = None    # local indices chosen by the current selection layer
    sliced: dict[tuple, Any] = field(default_factory=dict)              # memo of sliced layer inputs
    shift: torch.Tensor | None = None      # restart: [B] positions removed from each row
    kept_valid: torch.Tensor | None = None  # restart: [B, K]


class TokenRetention(contextlib.AbstractContextManager):
    """Wire a registered token-retention method into a transformers decoder for the ``with`` block.

    ``stages``: ``[(layer, k or ratio), ...]``; ``method``: a registered ``attention`` method (its
    parameters as ``params``); ``kv_manager``: a registered ``kv_manager`` (default "keep_kv": earlier
    layers keep their full prompt KV) with ``kv_params``. After a prefill, :attr:`kept` holds each stage's
    kept token indices [B, K] (positions in the padded prompt) and :meth:`cached_tokens` each layer's
    cached prompt-token count.
    """

    def __init__(self, model, stages: Any, method: str = "prompt_distill", kv_manager: str = "keep_kv",
                 params: dict[str, Any] | None = None, kv_params: dict[str, Any] | None = None) -> None:
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ParamError(f"token retention supports {', '.join(SUPPORTED_MODEL_TYPES)} decoders; "
                             f"this model is {model_type!r}")
        self.model = model
        self.window = getattr(config, "sliding_window", None)  # None unless the model uses one
        self.base_model = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.layers = list(self.base_model.layers)
        self.plan = RetentionPlan(stages, len(self.layers), method=method, params=params, kv_manager=kv_manager,
                                  kv_params=kv_params)
        self.restart = self.plan.restart
        self._prompt: _Prompt | None = None      # the state of the forward that is running
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> its prompt's state
        self._warned: set[str] = set()
        self._handles: list[Any] = []
        self._saved_impl: str | None = None
        self._probing = False

    # ----------------------------------------------------------------------------------------- wiring
    def __enter__(self) -> TokenRetention:
        if any(getattr(layer.self_attn, "_llmgraft_retention", None) for layer in self.layers):
            raise ParamError("this model is already inside a token-retention block")
        impl = self.model.config._attn_implementation
        if impl not in _BASES:
            raise ParamError(f"token retention runs on the 'sdpa' or 'eager' attention implementations, "
                             f"this model uses {impl!r}")
        _register_interfaces()
        self._saved_impl = impl
        _set_attn_implementation(self.model, f"llmgraft_{impl}")
        self._handles.append(self.base_model.register_forward_pre_hook(self._before_model, with_kwargs=True))
        self._handles.append(self.base_model.register_forward_hook(self._after_model))
        if self.model is not self.base_model:
            self._handles.append(self.model.register_forward_pre_hook(_refuse_labels, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            layer.self_attn._llmgraft_retention = self
            self._handles.append(layer.register_forward_pre_hook(
                _bind(self._before_layer, index), with_kwargs=True))
            if index in self.plan.at:
                self._handles.append(layer.register_forward_hook(
                    _bind(self._after_stage, index), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for layer in self.layers:
            layer.self_attn.__dict__.pop("_llmgraft_retention", None)
        if self._saved_impl is not None:
            _set_attn_implementation(self.model, self._saved_impl)
            self._saved_impl = None

    # ------------------------------------------------------------------------------------- reporting
    @property
    def kept(self) -> list[torch.Tensor]:
        """Per stage, the last prefill's kept token indices [B, K] (positions in the padded prompt)."""
        return list(self._prompt.kept) if self._prompt else []

    def cached_tokens(self, cache) -> list[int]:
        """Per layer, the number of token positions its cache holds (``past_key_values`` of a call)."""
        return [int(layer.keys.shape[-2]) if getattr(layer, "keys", None) is not None else 0
                for layer in cache.layers]

    # --------------------------------------------------------------------------------------- the hooks
    def _before_model(self, module, args, kwargs):
        if self._probing:
            return None
        self._prompt = None
        ids, embeds = kwargs.get("input_ids", args[0] if args else None), kwargs.get("inputs_embeds")
        tokens = ids if ids is not None else embeds
        if tokens is None:
            return None
        cache = kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, DynamicCache):
            raise ParamError(f"token retention needs transformers' dynamic cache, not {type(cache).__name__} "
                             "(leave generate's cache_implementation unset)")
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ParamError("token retention needs a 2-D attention mask (or none), not a prepared 4-D mask")
        if cache is None or cache.get_seq_length() == 0:
            return self._start_prompt(args, kwargs, tokens, cache, mask)
        prompt = self._states.get(cache)
        if prompt is None:
            self._warn("foreign-cache", "token retention: this cache was filled outside the block, so nothing in "
                       "this call is selected")
            return None
        self._prompt = prompt
        new = tokens.shape[1]
        prompt.prefill, prompt.sliced = False, {}
        prompt.seen += new
        self._check_window(prompt.seen)
        if self.restart and prompt.shift is not None:
            return args, self._restart_decode(kwargs, new)
        if any(self.plan.truncate.values()):  # layer 0's cache may be shorter than the history: say how long
            changed = {}
            if mask is None:
                changed["attention_mask"] = torch.ones(tokens.shape[0], prompt.seen, dtype=torch.long,
                                                       device=tokens.device)
            if kwargs.get("position_ids") is None:
                changed["position_ids"] = torch.arange(prompt.seen - new, prompt.seen, device=tokens.device)[None]
            return (args, {**kwargs, **changed}) if changed else None
        return None

    def _start_prompt(self, args, kwargs, tokens, cache, mask):
        length = tokens.shape[1]
        self._check_window(length)
        if cache is None and kwargs.get("use_cache") is False:
            self._warn("no-cache", "token retention with use_cache=False: each call selects over its whole input, "
                       "so generate(use_cache=False) selects again at every step")
        valid = (mask[:, -length:] if mask is not None else torch.ones(tokens.shape[:2], dtype=torch.long,
                                                                        device=tokens.device)).bool()
        if not bool(valid[:, -1].all()):
            raise ParamError("token retention needs left padding (tokenizer.padding_side = 'left'): a row's "
                             "last prompt position is padding")
        self._prompt = _Prompt(length, valid, seen=length)
        if cache is not None:
            self._states[cache] = self._prompt
        if self.restart:
            return args, self._restart_prefill(args, kwargs, valid)
        if mask is None and any(self.plan.truncate.values()):
            return args, {**kwargs, "attention_mask": valid.long()}
        return None

    def _after_model(self, module, args, output):
        prompt = self._prompt
        if prompt is None or self._probing:
            return
        cache = getattr(output, "past_key_values", None)
        if prompt.prefill and cache is not None:
            self._states[cache] = prompt  # a cache the model created itself
        prompt.prefill, prompt.sliced, prompt.pending = False, {}, None

    def _check_window(self, length: int) -> None:
        if self.window is not None and length > self.window:
            raise ParamError(f"token retention does not support sliding-window attention beyond the window: this "
                             f"model attends to the last {self.window} tokens and the sequence has {length}")

    def _warn(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=4)

    def _before_layer(self, index: int, module, args, kwargs):
        prompt = self._prompt
        if prompt is None or self._probing and prompt.rows is None:
            return None
        if prompt.prefill:
            prompt.cols[index] = prompt.rows
            if prompt.rows is None:
                return None
            changed = {}
            for name in ("position_embeddings", "position_ids", "attention_mask"):
                value = kwargs.get(name)
                if value is not None:
                    changed[name] = self._memo(prompt, name, value, lambda v, n=name: self._slice_prefill(n, v))
            return args, {**kwargs, **changed}
        cols = prompt.cols.get(index)
        mask = kwargs.get("attention_mask")
        if cols is None or mask is None or not isinstance(mask, torch.Tensor):
            return None
        sliced = self._memo(prompt, ("cols", id(cols)), mask, lambda m: self._slice_columns(prompt, cols, m))
        return args, {**kwargs, "attention_mask": sliced}

    def _after_stage(self, index: int, module, args, kwargs, output):
        prompt = self._prompt
        if prompt is None or not prompt.prefill or self.restart and not self._probing:
            return None
        if prompt.pending is None:  # the stage kept everything it saw
            hidden = output[0] if isinstance(output, tuple) else output
            every = torch.arange(hidden.shape[1], device=hidden.device).expand(hidden.shape[0], -1)
            prompt.kept.append(every if prompt.rows is None else prompt.rows)
            if self._probing and index == max(self.plan.at):
                raise _Stop  # the probe has nothing left to select
            return None
        local, prompt.pending = prompt.pending, None
        rows = local if prompt.rows is None else prompt.rows.gather(1, local)
        prompt.rows, prompt.sliced = rows, {}
        prompt.kept.append(rows)
        if self._probing:
            raise _Stop
        cache = kwargs.get("past_key_values")
        if cache is not None:
            for layer in self.plan.truncate[index]:
                self._truncate_cache(cache, layer, prompt, rows)
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = gather_tokens(hidden, local)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def observe(self, module, query: torch.Tensor, keys: torch.Tensor) -> None:
        """Called by the attention wrapper: score and select at a selection layer during the prefill."""
        prompt, index = self._prompt, module.layer_idx
        if prompt is None or not prompt.prefill or index not in self.plan.at or \
                self.restart and not self._probing:
            return
        valid = prompt.valid if prompt.rows is None else prompt.valid.gather(1, prompt.rows)
        selected = self.plan.select(index, query, keys, valid)
        if selected is not None:
            prompt.pending = selected[0]

    # ------------------------------------------------------------------------------------ the slicing
    @staticmethod
    def _memo(prompt: _Prompt, key, value, make):
        key = (key, id(value) if not isinstance(value, tuple) else tuple(id(v) for v in value))
        if key not in prompt.sliced:
            prompt.sliced[key] = (value, make(value))  # keep value alive so its id is not reused
        return prompt.sliced[key][1]

    def _slice_prefill(self, name: str, value):
        rows = self._prompt.rows
        if name == "position_embeddings":
            return tuple(gather_tokens(v, rows) for v in value)
        if name == "position_ids":
            return gather_tokens(value, rows)
        if not isinstance(value, torch.Tensor):  # a BlockMask or the like
            raise ParamError("token retention supports tensor attention masks (sdpa, eager)")
        return gather_tokens(gather_tokens(value, rows, dim=2), rows, dim=3)

    @staticmethod
    def _slice_columns(prompt: _Prompt, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        later = torch.arange(prompt.length, mask.shape[-1], device=cols.device)
        full = torch.cat([cols, later.expand(cols.shape[0], -1)], 1)
        return gather_tokens(mask, full, dim=3)

    def _truncate_cache(self, cache, index: int, prompt: _Prompt, rows: torch.Tensor) -> None:
        layer = cache.layers[index]
        held = prompt.cols.get(index)
        local = rows if held is None else torch.searchsorted(held, rows)
        layer.keys = gather_tokens(layer.keys, local, dim=2)
        layer.values = gather_tokens(layer.values, local, dim=2)
        prompt.cols[index] = rows

    # ------------------------------------------------------------------------------ mode "restart"
    def _restart_prefill(self, args, kwargs, valid):
        prompt = self._prompt
        probe = {k: v for k, v in kwargs.items() if k in ("input_ids", "inputs_embeds", "attention_mask",
                                                          "position_ids")}
        if args:
            probe["input_ids"] = args[0]
        self._probing = True
        try:
            self.base_model(**probe, use_cache=False)
        except _Stop:
            pass
        finally:
            self._probing = False
        rows = prompt.rows
        if rows is None:
            return kwargs  # every stage kept the whole prompt (k covers it): run it as it is
        kept_valid = valid.gather(1, rows)
        prompt.kept_valid, prompt.shift = kept_valid, valid.sum(1) - kept_valid.sum(1)
        prompt.rows = None
        out = dict(kwargs)
        if args:
            out["input_ids"] = gather_tokens(args[0], rows)
        for name in ("input_ids", "inputs_embeds"):
            if kwargs.get(name) is not None:
                out[name] = gather_tokens(kwargs[name], rows)
        out["attention_mask"] = kept_valid.long()
        positions = kept_valid.long().cumsum(1) - 1
        out["position_ids"] = positions.masked_fill(~kept_valid, 0)
        return out

    def _restart_decode(self, kwargs, new: int):
        prompt = self._prompt
        out = dict(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            out["attention_mask"] = torch.cat([prompt.kept_valid.long(), mask[:, prompt.length:]], 1)
        positions = kwargs.get("position_ids")
        if positions is not None:
            out["position_ids"] = positions - prompt.shift[:, None]
        return out


def _bind(hook, index: int):
    def bound(*args, **kwargs):
        return hook(index, *args, **kwargs)
    return bound


def _set_attn_implementation(model, name: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


_REGISTERED = False


def _register_interfaces() -> None:
    """Register ``llmgraft_sdpa`` / ``llmgraft_eager`` attention and mask functions (once per process)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for base in _BASES:
        AttentionInterface.register(f"llmgraft_{base}", _attention(base, ALL_ATTENTION_FUNCTIONS))
        AttentionMaskInterface.register(f"llmgraft_{base}", _mask(ALL_MASK_ATTENTION_FUNCTIONS[base]))
    _REGISTERED = True


def _attention(base: str, functions):
    def attend(module, query, key, value, attention_mask, **kwargs):
        retention = getattr(module, "_llmgraft_retention", None)
        if retention is not None:
            retention.observe(module, query, key)
        if base == "eager":  # each modeling file defines its own eager attention
            function = sys.modules[type(module).__module__].eager_attention_forward
        else:
            function = functions[base]
        return function(module, query, key, value, attention_mask, **kwargs)
    return attend


def _mask(original):
    def make(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, attention_mask=None, **kwargs):
        # A cache whose layer 0 holds fewer tokens than the history (a kv_manager cut it) sizes the mask by
        # that layer; the 2-D padding mask knows the true length, and each layer's pre-hook slices its columns.
        if attention_mask is not None and attention_mask.dim() == 2 and \
                attention_mask.shape[-1] > kv_length + kv_offset:
            kv_length, kv_offset = attention_mask.shape[-1], 0
            q_offset = kv_length - q_length
        return original(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, attention_mask=attention_mask, **kwargs)
    return make


def prompt_distill(model, stages: Any, method: str = "prompt_distill", kv_manager: str = "keep_kv",
                   params: dict[str, Any] | None = None, kv_params: dict[str, Any] | None = None,
                   **method_params) -> TokenRetention:
    """``with prompt_distill(model, stages=[(layer, k or ratio)]): model.generate(...)``: PromptDistill (or
    any registered ``attention`` method) for the block; the method's parameters as ``params`` or keywords."""
    return TokenRetention(model, stages, method=method, kv_manager=kv_manager,
                          params={**(params or {}), **method_params}, kv_params=kv_params)
