"""``llmgraft demo distill``: the bundled code LM with and without PromptDistill on long held-out stdlib
files, in transformers and in vLLM: prefill time, KV-cache size and agreement of the next token."""

from __future__ import annotations

import gc
import os
import statistics
import time

STAGES = [(1, 0.25)]


def run_distill_demo(prompts: int = 24, length: int = 1000, vllm: bool = True) -> list[list]:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines in this process: seconds to start
    import torch
    from transformers import AutoModelForCausalLM

    from .integrations.transformers.retention import prompt_distill
    from .report import format_table
    from .testing.models import code_lm_path
    from .testing.retention_eval import cache_bytes, heldout_prompts, kl_and_agreement, median_seconds

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(code_lm_path(), dtype=torch.float32).eval()
    batch = heldout_prompts(length, prompts)
    settings = {"stages": STAGES}

    def prefill(ids, distill):
        with torch.no_grad():
            if not distill:
                return model(input_ids=ids, use_cache=True, logits_to_keep=1)
            with prompt_distill(model, **settings):
                return model(input_ids=ids, use_cache=True, logits_to_keep=1)

    runs = {name: (lambda d=distill: [prefill(batch[i:i + 1], d) for i in range(len(batch))])
            for name, distill in (("full", False), ("distill", True))}
    times = median_seconds(runs, repeats=3)
    outputs = {name: [prefill(batch[i:i + 1], name == "distill") for i in range(len(batch))] for name in runs}
    logp = {name: torch.cat([torch.log_softmax(o.logits[:, -1].double(), -1) for o in outs])
            for name, outs in outputs.items()}
    kv = {name: [cache_bytes(o.past_key_values) for o in outs] for name, outs in outputs.items()}
    kl, agree = kl_and_agreement(logp["full"], logp["distill"])
    mib = 1 / (1 << 20)

    def kv_cells(name):
        per_prompt = statistics.mean(sum(layers) for layers in kv[name]) * mib
        later = statistics.mean(sum(layers[STAGES[0][0] + 1:]) for layers in kv[name]) * mib
        return f"{per_prompt:.2f}", f"{later:.2f}"

    ms = {name: statistics.median(t) / len(batch) * 1e3 for name, t in times.items()}
    stage_note = f"PromptDistill, keep {STAGES[0][1]:.0%} after layer {STAGES[0][0]}"
    rows = [["transformers", "full model", f"{ms['full']:.1f}", *kv_cells("full"), "100%", "0"],
            ["transformers", stage_note, f"{ms['distill']:.1f}", *kv_cells("distill"), f"{agree:.0%}", f"{kl:.3f}"]]
    if vllm:
        rows += _vllm_rows(batch, logp["full"], stage_note)
    later = f"KV of layers {STAGES[0][0] + 1}-{len(model.model.layers) - 1}"
    print(format_table(["engine", "run", "prefill ms/prompt", "KV MiB/prompt", later,
                        "next token = full", "KL to full"], rows,
                       title=f"The code LM on {len(batch)} held-out stdlib prompts of {length} tokens"))
    print(f"({time.perf_counter() - start:.0f} s. vLLM reserves KV for every layer at full length, so its KV "
          "columns stay as the full model's; see README, 'PromptDistill'.)")
    return rows


def _vllm_rows(batch, reference, stage_note: str) -> list[list]:
    import torch
    from vllm import SamplingParams

    from .testing.engine import cpu_engine
    from .testing.models import code_lm_path

    rows = []
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=0)
    prompts = [{"prompt_token_ids": ids.tolist()} for ids in batch]
    for label, extra in (("full model", {}), (stage_note, {
            "hf_overrides": {"architectures": ["LlmgraftLlamaForCausalLM"]},
            "additional_config": {"llmgraft": {"prompt_distill": {"stages": [list(s) for s in STAGES]}}}})):
        llm = cpu_engine(code_lm_path(), max_model_len=1024, max_num_batched_tokens=1024, max_num_seqs=1,
                         enable_chunked_prefill=False, enable_prefix_caching=False, **extra)
        llm.generate(prompts[:2], params, use_tqdm=False)
        begin = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - begin
        tokens = torch.tensor([o.outputs[0].token_ids[0] for o in out])
        agree = float((tokens == reference.argmax(-1)).double().mean())
        rows.append(["vLLM", label, f"{seconds / len(prompts) * 1e3:.1f}", "", "", f"{agree:.0%}", ""])
        del llm
        gc.collect()
    return rows
