"""PromptDistill (any "continue" token-retention method) inside vLLM, as out-of-tree model classes.

Enable it with two flags, and whole-prompt prefills::

    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --hf-overrides '{"architectures": ["LlmgraftLlamaForCausalLM"]}' \\
        --additional-config '{"llmgraft": {"prompt_distill": {"stages": [[1, 0.25]]}}}' \\
        --no-enable-chunked-prefill --no-enable-prefix-caching

``LlmgraftLlamaForCausalLM`` (and the Qwen2 and Mistral twins) is vLLM's own model class with one forward
of its own: after a selection layer, only the kept prompt tokens go on, at their original positions. vLLM
looks up each attention layer's metadata and KV slot mapping by layer name in the forward context, so for
the layers after a selection the forward swaps in a metadata of its own: each request's query is its kept
tokens, their KV goes to the first K slots of the request's blocks (compacted), and its sequence length
is K (+ the generated tokens while decoding). A decode token at original position p is written at slot
K + (p - T) of those layers. The causal kernel aligns queries with the end of the sequence, which is
exactly right over compacted, in-order tokens. What this saves and what it cannot: README, "PromptDistill".

Requirements, checked at engine start: the CPU attention backend, tensor and pipeline parallel size 1,
chunked prefill off (a first chunk looks like a whole prompt, and would be cut), prefix caching off (a
cached prefix would skip the selection layer's keys). A preempted request is recomputed by vLLM as one
prompt (its generated tokens included), so size the KV cache to avoid preemption.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.forward_context import get_forward_context
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ...hooks.errors import LLMGraftError, ParamError
from ...hooks.retention import SETTINGS_KEY, RetentionPlan
from .startup import report


@dataclasses.dataclass
class _Request:
    """A running request's retention: its prompt length and the tokens each stage kept."""

    prompt: int
    kept: list[int]


class _Retention:
    """The retention state of one model instance: its plan, the stages' captured queries and keys, and
    each running request's kept counts (keyed by its first KV block, unique while it runs)."""

    def __init__(self, model: Any, vllm_config: Any) -> None:
        settings = (((vllm_config.additional_config or {}).get("llmgraft") or {}).get(SETTINGS_KEY))
        where = f"--additional-config llmgraft.{SETTINGS_KEY}"
        try:
            if settings is None:
                raise ParamError(f"{type(model).__name__} needs its settings: --additional-config "
                                 f"'{{\"llmgraft\": {{\"{SETTINGS_KEY}\": {{\"stages\": [[layer, k or ratio]]}}}}}}'")
            self.plan = RetentionPlan.from_settings(settings, len(model.model.layers), where=where)
            _check_engine(self.plan, vllm_config)
        except LLMGraftError as exc:
            report(f"invalid {where}: {exc}")
            raise
        self.dtype = vllm_config.model_config.dtype
        self.kv_dtype = vllm_config.cache_config.cache_dtype
        self.names = [layer.self_attn.attn.layer_name for layer in model.model.layers]
        self.attention = [layer.self_attn.attn for layer in model.model.layers]
        self.requests: dict[int, _Request] = {}
        self.captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for stage in self.plan.stages:
            self.attention[stage.layer].register_forward_pre_hook(self._capture(stage.layer))

    def _capture(self, layer: int):
        def hook(module, args):
            self.captured[layer] = (args[0], args[1])  # RoPE'd queries and keys [tokens, heads * dim]
        return hook

    def stage(self, number: int, layer: int, metadata: Any, original: Any) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """For the layers after stage ``number`` (at ``layer``): the rows of this step's current tokens that
        go on, their attention metadata and their KV slots. ``metadata`` is the current group's,
        ``original`` the step's own (whose sequence lengths tell prompts from decodes)."""
        query, keys = self.captured.pop(layer)
        attention = self.attention[layer]
        impl = attention.impl
        block = attention.kv_cache.shape[2]
        device = query.device
        starts = metadata.query_start_loc.tolist()
        seq_lens, asked = original.seq_lens.tolist(), original.query_start_loc.diff().tolist()
        firsts = metadata.block_table[:, 0].tolist()
        rows, compact, new_lens = [], [], []  # per request: rows kept, their compacted KV indices, its length
        for r, (begin, end) in enumerate(zip(starts, starts[1:])):
            if end == begin:
                rows.append(torch.arange(0, device=device))
                compact.append(rows[-1])
                new_lens.append(0)
                continue
            if seq_lens[r] == asked[r]:  # a whole prompt in this step
                n = end - begin
                m = min(self.plan.queries, n)  # the last m prompt tokens' queries, [1, H, m, D]
                q = query[end - m:end].view(m, impl.num_heads, impl.head_size).transpose(0, 1)[None]
                k = keys[begin:end].view(n, impl.num_kv_heads, impl.head_size).transpose(0, 1)[None]
                chosen = self.plan.select(layer, q, k, torch.ones(1, n, dtype=torch.bool, device=device))
                local = chosen[0][0] if chosen is not None else torch.arange(n, device=device)
                if number == 0:
                    self.requests[firsts[r]] = _Request(prompt=n, kept=[])
                state = self.requests[firsts[r]]
                state.kept = state.kept[:number] + [len(local)]
                rows.append(local + begin)
                compact.append(torch.arange(len(local), device=device))
                new_lens.append(len(local))
                continue
            state = self.requests.get(firsts[r])
            history = seq_lens[r] - asked[r]
            if state is None or len(state.kept) <= number or history < state.prompt:
                raise RuntimeError("llmgraft token retention lost track of a request (a prompt split over "
                                   "steps, a prefix-cache hit or a preempted request)")
            shift = state.kept[number] - state.prompt  # position p is written at compacted index p + shift
            rows.append(torch.arange(begin, end, device=device))
            compact.append(torch.arange(history, seq_lens[r], device=device) + shift)
            new_lens.append(seq_lens[r] + shift)
        counts = torch.tensor([len(c) for c in compact], device=device)
        owner = torch.repeat_interleave(torch.arange(len(compact), device=device), counts)
        index = torch.cat(compact)
        slots = metadata.block_table[owner, index // block].to(metadata.slot_mapping.dtype) * block + index % block
        starts_t = torch.zeros(len(compact) + 1, dtype=metadata.query_start_loc.dtype, device=device)
        starts_t[1:] = counts.cumsum(0)
        lens_t = torch.tensor(new_lens, dtype=metadata.seq_lens.dtype, device=device)
        schedule = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(new_lens), num_heads=impl.num_heads, num_kv_heads=impl.num_kv_heads,
            head_dim=impl.head_size, seq_lens=lens_t, dtype=self.dtype, query_start_loc=starts_t, causal=True,
            sliding_window_size=impl.sliding_window, isa=attention.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=self.kv_dtype)
        new = dataclasses.replace(
            metadata, num_actual_tokens=len(index), max_query_len=int(counts.max()) if len(counts) else 0,
            query_start_loc=starts_t, max_seq_len=max(new_lens, default=0), seq_lens=lens_t,
            slot_mapping=slots, scheduler_metadata=schedule)
        return torch.cat(rows), new, slots


def _check_engine(plan: RetentionPlan, vllm_config: Any) -> None:
    if plan.restart:
        raise ParamError(f"{plan.method.name!r} reruns the model on its kept tokens as a new prompt, which vLLM's "
                         "model classes cannot do in one forward; use it in transformers (llmgraft.prompt_distill)")
    if any(plan.truncate.values()):
        raise ParamError(f"kv_manager {plan.kv_manager.name!r} cuts earlier layers' KV, which vLLM cannot: every "
                         "layer shares one block table, so it would free no memory; use 'keep_kv'")
    if getattr(vllm_config.scheduler_config, "enable_chunked_prefill", False):
        raise ParamError("token retention needs whole-prompt prefills: start vLLM with --no-enable-chunked-prefill "
                         "(LLM(enable_chunked_prefill=False))")
    if getattr(vllm_config.cache_config, "enable_prefix_caching", False):
        raise ParamError("token retention needs prefix caching off: --no-enable-prefix-caching "
                         "(LLM(enable_prefix_caching=False))")
    if getattr(vllm_config.model_config.hf_config, "sliding_window", None) is not None:
        raise ParamError("token retention in vLLM does not support sliding-window attention (the window would count "
                         "compacted positions)")
    parallel = vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ParamError("token retention in vLLM runs with tensor and pipeline parallel size 1")


class TokenRetentionModel:
    """Mixin over a vLLM decoder-only model class: the forward described in the module docstring."""

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.retention = _Retention(self, vllm_config)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        context = get_forward_context()
        metadata = context.attn_metadata
        retention = self.retention
        step = metadata.get(retention.names[0]) if isinstance(metadata, dict) else None
        if step is None:  # a profiling or warm-up run without metadata
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if not hasattr(step, "scheduler_metadata") or not hasattr(step, "block_table"):
            raise RuntimeError(f"llmgraft token retention supports vLLM's CPU attention backend, not "
                               f"{type(step).__name__}")
        model, total = self.model, len(positions)
        hidden = inputs_embeds if inputs_embeds is not None else model.embed_input_ids(input_ids)
        residual, rows, current = None, None, step
        saved = context.attn_metadata, context.slot_mapping
        try:
            for index, layer in enumerate(model.layers):
                hidden, residual = layer(positions, hidden, residual)
                stage = retention.plan.at.get(index)
                if stage is None:
                    continue
                number = retention.plan.stages.index(stage)
                keep, current, slots = retention.stage(number, index, current, step)
                hidden, residual, positions = hidden[keep], residual[keep], positions[keep]
                rows = keep if rows is None else rows[keep]
                later = retention.names[index + 1:]
                context.attn_metadata = {**context.attn_metadata, **{name: current for name in later}}
                context.slot_mapping = {**context.slot_mapping, **{name: slots for name in later}}
        finally:
            context.attn_metadata, context.slot_mapping = saved
            retention.captured.clear()
        hidden, _ = model.norm(hidden, residual)
        if rows is None:
            return hidden
        out = hidden.new_zeros((total, hidden.shape[-1]))
        out[rows] = hidden  # the dropped rows' outputs are never read: each request's last token is kept
        return out


class LlmgraftLlamaForCausalLM(TokenRetentionModel, LlamaForCausalLM):
    """vLLM's Llama with token retention (``--additional-config`` llmgraft.prompt_distill)."""


class LlmgraftQwen2ForCausalLM(TokenRetentionModel, Qwen2ForCausalLM):
    """vLLM's Qwen2 with token retention (``--additional-config`` llmgraft.prompt_distill)."""


class LlmgraftMistralForCausalLM(TokenRetentionModel, MistralForCausalLM):
    """vLLM's Mistral with token retention (``--additional-config`` llmgraft.prompt_distill)."""
