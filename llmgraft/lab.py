"""``llmgraft lab``: the sampler lab. Sweep each sampler's knob on a real vLLM engine and place every point on
a quality frontier: diversity (distinct-2 across the samples of one prompt) against coherence (the share of
statement-level completions that parse as Python), with the mean NLL of the generated text under the model
itself at T=1 and the mean kept-set size beside them.

Kept-set sizes and NLL are measured independently of the engine: a transformers forward pass over each
completion gives the model's logits at every step, and each sampler's own rule is applied to them.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .hooks.errors import LLMGraftError
from .metrics import distinct_n, statement_is_valid


@dataclass(frozen=True)
class Point:
    """One configuration of a sweep: what vLLM gets, and the knob value it stands for."""

    sampler: str
    knob: str
    value: float
    temperature: float
    vllm_args: dict


#: Each sampler's sweep at the lab temperature T (pure sampling and p-less sweep the temperature itself).
def sweeps(temperature: float = 1.0, quick: bool = False) -> dict[str, list[Point]]:
    def grid(values):
        return values[::2] if quick else values

    temps = grid([0.5, 0.7, 1.0, 1.3, 1.6, 2.0])
    out: dict[str, list[Point]] = {
        "temperature": [Point("temperature", "T", t, t, {}) for t in temps],
        "top_p": [Point("top_p", "p", v, temperature, {"top_p": v}) for v in grid([0.5, 0.7, 0.8, 0.9, 0.95])],
        "min_p": [Point("min_p", "min_p", v, temperature, {"min_p": v}) for v in grid([0.3, 0.2, 0.1, 0.05, 0.02])],
        "top_w": [Point("top_w", "beta", v, temperature, {"extra_args": {"top_w": v}})
                  for v in grid([2.8, 3.5, 5.0, 8.0, 14.0])],
        "top_nsigma": [Point("top_nsigma", "n", v, temperature, {"extra_args": {"top_nsigma": v}})
                       for v in grid([0.5, 1.0, 1.5, 2.0, 3.0])],
        "p_less": [Point("p_less", "T", t, t, {"extra_args": {"llmgraft_sampler": "p_less"}}) for t in temps],
    }
    for variant in ("reference", "hf", "paper"):
        out[f"top_h:{variant}"] = [
            Point(f"top_h:{variant}", "alpha", v, temperature, {"extra_args": {"top_h": v, "top_h_variant": variant}})
            for v in grid([0.2, 0.4, 0.6, 0.8, 0.95])]
    return out


def expand(names: Sequence[str], temperature: float = 1.0, quick: bool = False) -> dict[str, list[Point]]:
    """The sweeps for ``names`` (``top_h`` means all three variants); an unknown name is a clear error."""
    from .hooks.names import closest

    table = sweeps(temperature, quick)
    known = sorted({n.split(":")[0] for n in table})
    chosen: dict[str, list[Point]] = {}
    for name in names:
        matches = [k for k in table if k == name or k.split(":")[0] == name]
        if not matches:
            hint = closest(name, known)
            raise LLMGraftError(f"unknown sampler {name!r} for the lab" + (f" (did you mean {hint!r}?)" if hint else "")
                                + f"; available: {', '.join(known)}")
        chosen.update({k: table[k] for k in matches})
    return chosen


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a file, by its suffix: ``.json`` a JSON array of strings; ``.jsonl`` one JSON string or
    ``{"prompt": ...}`` per line; anything else one prompt per line (``\\n`` escapes become newlines)."""
    path = Path(path)
    if not path.is_file():
        raise LLMGraftError(f"prompt file {str(path)!r} does not exist")
    text = path.read_text(encoding="utf-8")
    prompts: list[Any] = []
    if path.suffix == ".json":
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LLMGraftError(f"prompt file {str(path)!r} is not valid JSON: {exc}") from None
        if not isinstance(prompts, list):
            raise LLMGraftError(f"prompt file {str(path)!r} must hold a JSON array of strings, got a "
                                f"{type(prompts).__name__}")
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise LLMGraftError(f"{path}:{number}: not JSON ({exc})") from None
                prompts.append(item.get("prompt") if isinstance(item, dict) else item)
            else:
                prompts.append(line.replace("\\n", "\n"))
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise LLMGraftError(f"prompt file {str(path)!r} holds no prompts (expected non-empty strings)")
    return prompts


def check_model_dir(model: str | Path) -> Path:
    path = Path(model)
    if not path.exists():
        raise LLMGraftError(f"model directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise LLMGraftError(f"model directory {str(path)!r} has no config.json (a Hugging Face model directory "
                            "with safetensors weights is expected)")
    if not any(path.glob("*.safetensors")):
        raise LLMGraftError(f"model directory {str(path)!r} has no *.safetensors weights (the lab loads "
                            "safetensors only; re-save the model with save_pretrained(safe_serialization=True))")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise LLMGraftError(f"model directory {str(path)!r} has no tokenizer (tokenizer.json or "
                            "tokenizer_config.json): save the tokenizer beside the model")
    return path


# ---- kept-set sizes: each sampler's own rule on the model's logits ---------------------------------------


def kept_top_p(logits, top_p: float):
    import torch
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    p = torch.full((logits.shape[0],), top_p)
    return torch.isfinite(apply_top_k_top_p_pytorch(logits.clone(), None, p)).sum(-1)


def kept_min_p(logits, min_p: float):
    probs = logits.softmax(-1)
    return (probs >= min_p * probs.amax(-1, keepdim=True)).sum(-1)


def kept_counter(point: Point, resources) -> Callable:
    """(temperature-scaled logits [steps, V]) -> tokens kept per step, by the point's own rule."""
    import torch

    if "top_p" in point.vllm_args:
        return lambda x: kept_top_p(x, point.vllm_args["top_p"])
    if "min_p" in point.vllm_args:
        return lambda x: kept_min_p(x, point.vllm_args["min_p"])
    if "extra_args" not in point.vllm_args:
        return lambda x: torch.isfinite(x).sum(-1)
    from .hooks.families import needs_of
    from .hooks.sampling import resolve_sampler

    choice = resolve_sampler(point.vllm_args["extra_args"], None)
    extra = (resources,) if needs_of(choice.sampler) else ()

    def kept(x):
        params = choice.params.stack([choice.params] * x.shape[0], device=x.device)
        return torch.isfinite(choice.sampler.apply(x.clone(), params, *extra)).sum(-1)

    return kept


# ---- the run -----------------------------------------------------------------------------------------------


def run_lab(model: str | Path, prompts: Sequence[str], samplers: Sequence[str], out_dir: str | Path,
            samples: int = 8, max_tokens: int = 48, temperature: float = 1.0, seed: int = 0,
            quick: bool = False, dtype: str = "float32", max_model_len: int = 1024,
            kv_cache_gib: float = 0.25) -> list[dict]:
    """Sweep, score, and write ``lab.md`` and ``frontier.png`` into ``out_dir``; returns one dict per point.

    ``dtype``, ``max_model_len`` and ``kv_cache_gib`` size the vLLM engine (and the transformers replay)."""
    if not samplers:
        raise LLMGraftError("no sampler to sweep (--samplers is empty)")
    if not temperature > 0:
        raise LLMGraftError(f"the sweep temperature must be > 0 (0 is greedy, where samplers do nothing), got "
                            f"{temperature}")
    if samples < 2:
        raise LLMGraftError(f"diversity compares samples of one prompt: --samples must be >= 2, got {samples}")
    chosen = expand(samplers, temperature, quick)
    model = check_model_dir(model)
    from .testing.engine import completion_logits, cpu_engine, set_cpu_engine_env

    set_cpu_engine_env(Path(os.environ.get("TMPDIR", "/tmp")) / "llmgraft-lab")
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from .hooks.resources import ModelResources

    t0 = time.perf_counter()
    engine = cpu_engine(model, seed=seed, max_num_seqs=64, dtype=dtype, max_model_len=max_model_len,
                        kv_cache_bytes=int(kv_cache_gib * 2**30))
    hf_model = AutoModelForCausalLM.from_pretrained(str(model), dtype=getattr(torch, dtype)).eval()
    resources = ModelResources({"input_embeddings": lambda: hf_model.get_input_embeddings().weight.detach()},
                               where=f"model {model.name}")
    print(f"engine ready in {time.perf_counter() - t0:.1f} s: {model.name}, {len(prompts)} prompts x "
          f"{samples} samples x {max_tokens} tokens")

    results = []
    for name, points in chosen.items():
        for point in tqdm(points, desc=f"{name:16s}", unit="point"):
            params = SamplingParams(n=samples, temperature=point.temperature, max_tokens=max_tokens, seed=seed,
                                    **point.vllm_args)
            outputs = engine.generate(list(prompts), params, use_tqdm=False)
            kept = kept_counter(point, resources)
            sizes, nll, count = [], 0.0, 0
            for output in outputs:
                for logits, tokens in completion_logits(hf_model, output):
                    if not tokens:
                        continue
                    sizes.append(kept(logits / point.temperature).float())
                    log_probs = logits.log_softmax(-1)  # the model itself at T=1
                    nll -= float(log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].sum())
                    count += len(tokens)
            completions = [(prompt, c) for prompt, o in zip(prompts, outputs) for c in o.outputs]
            results.append({
                "sampler": name, "knob": point.knob, "value": point.value, "temperature": point.temperature,
                "distinct_2": sum(distinct_n([list(c.token_ids) for c in o.outputs], 2) for o in outputs) / len(outputs),
                "valid": sum(statement_is_valid(p, c.text) for p, c in completions) / len(completions),
                "nll": nll / max(count, 1),
                "kept": float(torch.cat(sizes).mean()) if sizes else 0.0,
            })
    write_report(results, Path(out_dir), model.name, samples, max_tokens)
    return results


def dominance(results: list[dict], better: str, worse: str) -> tuple[int, int]:
    """(points of ``worse`` that some point of ``better`` matches or beats on both axes, points of ``worse``)."""
    a = [r for r in results if r["sampler"] == better]
    b = [r for r in results if r["sampler"] == worse]
    covered = sum(any(x["valid"] >= y["valid"] and x["distinct_2"] >= y["distinct_2"] for x in a) for y in b)
    return covered, len(b)


def write_report(results: list[dict], out_dir: Path, model: str, samples: int, max_tokens: int) -> None:
    from .report import format_table, frontier_plot, markdown_table

    headers = ["sampler", "knob", "T", "distinct-2", "valid Python %", "NLL (T=1)", "mean kept"]
    rows = [[r["sampler"], f"{r['knob']}={r['value']:g}", f"{r['temperature']:.1f}", r["distinct_2"], 100 * r["valid"],
             r["nll"], r["kept"]] for r in results]
    title = (f"Sampler lab on {model}: {samples} samples per prompt, {max_tokens} tokens; distinct-2 within a "
             "prompt's samples; valid = the first logical line parses; NLL per token under the model at T=1")
    print()
    print(format_table(headers, rows, title=title))
    claims = []
    names = {r["sampler"] for r in results}
    for variant in ("top_h:reference", "top_h:hf", "top_h:paper"):
        if variant in names and "min_p" in names:
            covered, total = dominance(results, variant, "min_p")
            claims.append(f"{variant} matches or beats min-p on both axes at {covered} of {total} min-p points")
    if claims:
        print("\n" + "\n".join(claims))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lab.md").write_text(f"# {title}\n\n{markdown_table(headers, rows)}\n\n"
                                    + "".join(f"- {c}\n" for c in claims))
    curves: dict[str, list[tuple[float, float, str]]] = {}
    for r in results:  # the legend names each curve's knob; the points carry its values
        curves.setdefault(f"{r['sampler']} ({r['knob']})", []).append(
            (r["distinct_2"], 100 * r["valid"], f"{r['value']:g}"))
    frontier_plot(out_dir / "frontier.png", curves, f"Quality frontier on {model}",
                  "diversity: distinct-2 within a prompt's samples", "coherence: valid Python statements %")
    (out_dir / "lab.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten: {out_dir / 'lab.md'}, {out_dir / 'frontier.png'}, {out_dir / 'lab.json'}")
