"""The llmgraft command.

    llmgraft plugins                 every loaded method: family, origin, description, parameters
    llmgraft demo [--plot demo.png]  vLLM on the bundled code LM: top-p vs min-p vs Top-H
    llmgraft demo samplers           a quick sampler lab on the bundled code LM (every sampler's frontier)
    llmgraft demo merge              fine-tunes of the code LM merged by every merger: loss, time, memory
    llmgraft demo mos                MoS against LoRA of equal trainable parameters on the code LM
    llmgraft demo slim-moe           SlimMoE on an MoE upcycled from the code LM: parameters and loss
    llmgraft demo distill            PromptDistill on the code LM in transformers and vLLM: time, KV, agreement
    llmgraft demo quant              the code LM as W4A16 and ternary: size, loss, vLLM tokens/s
    llmgraft lab --model DIR --prompts FILE --samplers top_p,min_p,top_h,top_w,top_nsigma,p_less
                                     sweep each sampler's knob on your model: table and frontier plot
    llmgraft merge --method mwa|tall|consensus|ties|task_arithmetic|uniform [--base B] IN... --out O
                                     merge full checkpoints (safetensors), streamed, written atomically
    llmgraft tall build --base B IN... --out STORE  /  llmgraft tall rebuild STORE --task T --out O
    llmgraft export-lora ADAPTER OUT  a saved MoS (any llmgraft adapter) as a plain LoRA adapter for vLLM
    llmgraft slim-moe --model M --calib FILE --stages 0.75,0.5 --tokens N --out O
                                     SlimMoE: slim every expert of an MoE model in prune + distil stages
    llmgraft quantize --format w4a16|ternary --model M --out O
                                     a checkpoint with quantized linear layers, for vLLM and transformers
    llmgraft prompt-distill --model M --prompt-file F --stages 1:0.25
                                     one prompt through transformers with and without token retention
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .hooks import FAMILIES, ParamError, get_registry
from .report import format_table


def cmd_plugins(_args: argparse.Namespace) -> int:
    registry = get_registry()
    print("llmgraft methods")
    for family in FAMILIES:
        for name in registry.names(family):
            entry = registry.entries[family][name]
            print(f"\n{family} {name} from {entry.origin}: {entry.obj.description}")
            primary = getattr(entry.obj, "primary", None)
            aliases = getattr(entry.obj.params_cls, "aliases", {})
            rows = [[p["name"] + (" *" if p["name"] == primary else ""), p["type"], repr(p["default"]),
                     p["range"] or "-",
                     p["help"] + "".join(f" (also: {a})" for a, n in aliases.items() if n == p["name"])]
                    for p in entry.obj.params_cls.describe()]
            if rows:
                table = format_table(["parameter", "type", "default", "range", "help"], rows)
                print("\n".join("  " + line for line in table.splitlines()))
            for key, meaning in (getattr(entry.obj, "input_values", None) or {}).items():
                print(f"  per input: {key}: {meaning}")
    print("\n* the primary parameter, set by the shorthand request field {\"<sampler>\": value}; "
          "(per row): may differ between the requests of one batch")
    empty = [f for f in FAMILIES if not registry.names(f)]
    if empty:
        print(f"\nfamilies with no method yet: {', '.join(empty)}")
    if registry.load_errors:
        print("\nplugins skipped:")
        for origin, message in registry.load_errors.items():
            print(f"  {origin}: {message}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.topic == "quant":
        from .demo_quant import run_quant_demo

        run_quant_demo()
        return 0
    if args.topic == "distill":
        from .demo_distill import run_distill_demo

        run_distill_demo()
        return 0
    if args.topic == "slim-moe":
        from .demo_slim import run_slim_demo

        run_slim_demo(seed=args.seed)
        return 0
    if args.topic == "mos":
        from .demo_mos import run_mos_demo

        run_mos_demo(seed=args.seed)
        return 0
    if args.topic == "merge":
        from .demo_merge import run_merge_demo

        run_merge_demo(seed=args.seed)
        return 0
    if args.topic == "samplers":
        from .demo import PROMPTS
        from .lab import run_lab
        from .testing.models import code_lm_path

        run_lab(args.model or code_lm_path(), PROMPTS, LAB_SAMPLERS, args.out, samples=4, max_tokens=32,
                seed=args.seed, quick=True)
        return 0
    from .demo import run_demo

    run_demo(model=args.model, samples=args.samples, max_tokens=args.max_tokens,
             temperatures=tuple(args.temperatures), plot=args.plot, seed=args.seed)
    return 0


LAB_SAMPLERS = ("temperature", "top_p", "min_p", "top_h", "top_w", "top_nsigma", "p_less")


def cmd_lab(args: argparse.Namespace) -> int:
    from .lab import read_prompts, run_lab

    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    run_lab(args.model, read_prompts(args.prompts), samplers, args.out, samples=args.samples,
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, quick=args.quick,
            dtype=args.dtype, max_model_len=args.max_model_len, kv_cache_gib=args.kv_cache_gib)
    return 0


def _assignments(pairs: list[str] | None, what: str) -> dict:
    """``key=value`` pairs; values parsed as JSON when they can be (numbers, true/false), else strings."""
    import json

    from .hooks.errors import ParamError

    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ParamError(f"{what} {pair!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _per_input_values(args: argparse.Namespace, count: int) -> list[dict] | None:
    from .hooks.errors import ParamError

    columns = {"loss": ("--losses", args.losses), "step": ("--steps", args.steps),
               "weight": ("--weights", args.weights)}
    given = {k: v for k, (_, v) in columns.items() if v}
    if not given:
        return None
    for key, values in given.items():
        if len(values) != count:
            raise ParamError(f"{columns[key][0]} has {len(values)} values for {count} inputs")
    return [{k: v[i] for k, v in given.items()} for i in range(count)]


def cmd_merge(args: argparse.Namespace) -> int:
    method = args.method.replace("-", "_")
    if method == "tall":  # TALL's output is a store, not a model: the same as `llmgraft tall build`
        tall = get_registry().get("merger", "tall").params_cls.from_mapping(_assignments(args.set, "--set"))
        _write_tall_store(args.inputs, args.base, args.out, lam=tall.lam, force=args.force)
        print(f"write task t's model with: llmgraft tall rebuild {args.out} --task t --out DIR")
        return 0
    if any((Path(p) / "adapter_config.json").is_file() for p in args.inputs):  # PEFT adapters: merge their deltas
        from .integrations.peft import merge_adapter_dirs

        report = merge_adapter_dirs(args.inputs, method, args.out, base=args.base,
                                    params=_assignments(args.set, "--set"),
                                    per_input=_per_input_values(args, len(args.inputs)), rank=args.rank,
                                    into_base=args.into_base, force=args.force)
        what = "a full model" if args.into_base else (
            f"a rank-{report['rank']} adapter" + ("" if report.get("exact") else
                                                  f" (relative error {report['relative_error']:.3g})"))
        print(f"merged {len(args.inputs)} adapters with {method} into {what} -> {args.out}")
        return 0
    if args.rank is not None or args.into_base:
        from .hooks.errors import ParamError

        raise ParamError("--rank and --into-base apply to PEFT adapter directories only")
    from .offline.merge import merge_checkpoints

    report = merge_checkpoints(method, args.inputs, args.out, base=args.base,
                               params=_assignments(args.set, "--set"),
                               per_input=_per_input_values(args, len(args.inputs)), force=args.force)
    print(f"merged {report['merged_tensors']} tensors of {len(args.inputs)} inputs with {report['method']} "
          f"in {report['seconds']:.1f} s -> {args.out}")
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from .integrations.peft import export_lora

    report = export_lora(args.adapter, args.out, force=args.force)
    print(f"exported {report['layers']} layers as a rank-{report['rank']} LoRA (lora_alpha {report['lora_alpha']:g}, "
          f"target_modules {', '.join(report['target_modules'])}) -> {args.out}")
    return 0


def _numbers(text: str, kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ParamError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_slim_moe(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .integrations.transformers.host import TransformersHost
    from .offline.merge import check_output

    out = check_output(args.out, args.force, [args.model])
    slim = get_registry().get("optimizer", "slim_moe")
    values = {"stages": _numbers(args.stages), "tokens": args.tokens, "calib": args.calib,
              "shared_expert": args.shared_expert, "importance": args.importance, "seed": args.seed}
    if args.stage_tokens:
        values["stage_tokens"] = _numbers(args.stage_tokens, int)
    params = slim.params_cls.from_mapping(values)
    with tqdm(total=len(params.stages), desc="SlimMoE stages", unit="stage") as bar:
        def progress(report):
            bar.set_postfix(size=report["size"], loss=f"{report.get('train_loss', float('nan')):.3f}")
            bar.update(1)

        report = slim.run(Path(args.model), out, params, TransformersHost(), progress=progress)
    print(f"slimmed {report['architecture']} {report['size_key']} {report['from']} -> {report['to']} in "
          f"{len(report['stages'])} stage(s) -> {out}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .offline.merge import check_output

    out = check_output(args.out, args.force, [args.model])
    quantize = get_registry().get("optimizer", "quantize")
    values = {"scheme": args.scheme, "group": args.group}
    if args.modules:
        values["modules"] = args.modules
    params = quantize.params_cls.from_mapping(values)
    with tqdm(desc=f"quantizing to {args.scheme}", unit="layer") as bar:
        report = quantize.run(Path(args.model), out, params, None, progress=lambda module: bar.update(1))
    print(f"{report['modules']} layers as {report['scheme']} (group {report['group']}): "
          f"{report['bytes_before'] / 2**20:.2f} MiB -> {report['bytes_after'] / 2**20:.2f} MiB -> {out}")
    for module, why in report["skipped"].items():
        print(f"  kept in full precision: {module} ({why})")
    return 0


def parse_stage_list(text: str) -> list[tuple[int, int | float]]:
    """``"1:0.25,2:64"`` → ``[(1, 0.25), (2, 64)]``: a keep with a decimal point is a ratio, else a count."""
    from .hooks.errors import ParamError

    stages = []
    for item in text.split(","):
        layer, sep, keep = item.strip().partition(":")
        try:
            if not sep:
                raise ValueError
            stages.append((int(layer), float(keep) if any(c in keep for c in ".eE") else int(keep)))
        except ValueError:
            raise ParamError(f"--stages takes LAYER:KEEP pairs such as 1:0.25 or 1:64, got {item.strip()!r}") from None
    return stages


def cmd_prompt_distill(args: argparse.Namespace) -> int:
    import contextlib
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .integrations.transformers.retention import prompt_distill
    from .report import format_table

    stages = parse_stage_list(args.stages)
    params, kv_params = dict(_key_values(args.param)), dict(_key_values(args.kv_param))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    retention = prompt_distill(model, stages=stages, method=args.method, kv_manager=args.kv_manager, params=params,
                               kv_params=kv_params)
    text = Path(args.prompt_file).read_text()
    enc = tokenizer(text, return_tensors="pt")
    if args.max_prompt_tokens:
        enc = {k: v[:, -args.max_prompt_tokens:] for k, v in enc.items()}
    rows, completions = [], {}
    for label, block in (("full model", None), (f"{args.method} {args.stages}", retention)):
        start = time.perf_counter()
        with torch.no_grad(), (block if block is not None else contextlib.nullcontext()):
            out = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 return_dict_in_generate=True)
        seconds = time.perf_counter() - start
        cached = retention.cached_tokens(out.past_key_values)
        completions[label] = tokenizer.decode(out.sequences[0, enc["input_ids"].shape[1]:])
        rows.append([label, enc["input_ids"].shape[1], " ".join(map(str, cached)), f"{seconds:.2f}"])
    print(format_table(["run", "prompt tokens", "cached tokens per layer", "seconds"], rows))
    for label, completion in completions.items():
        print(f"\n--- {label}:\n{completion}")
    return 0


def _key_values(items: list[str] | None) -> list[tuple[str, object]]:
    import json

    from .hooks.errors import ParamError

    out = []
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ParamError(f"--param takes NAME=VALUE, got {item!r}")
        try:
            out.append((key, json.loads(value)))
        except json.JSONDecodeError:
            out.append((key, value))
    return out


def _tall_task_models(inputs: list[str], base: str | None, scratch: Path) -> list[str]:
    """Full checkpoints for TALL: checkpoint directories as they are; each saved PEFT adapter written into
    a full model (base + its exact dense ΔW) under ``scratch``, since TALL masks full-rank task vectors."""
    adapters = [(Path(p) / "adapter_config.json").is_file() for p in inputs]
    if not any(adapters):
        return inputs
    if not all(adapters):
        raise ParamError("give TALL either full checkpoints or PEFT adapter directories, not a mix")
    from tqdm import tqdm

    from .integrations.peft import merge_adapter_dirs

    models = []
    for i, path in enumerate(tqdm(inputs, desc="adapters -> full models", unit="adapter")):
        models.append(str(scratch / f"task-{i}"))
        merge_adapter_dirs([path], "uniform", models[-1], base=base, into_base=True)
    return models


def cmd_tall(args: argparse.Namespace) -> int:
    if args.tall_command == "rebuild":
        from .offline.merge import rebuild_tall

        rebuild_tall(args.store, args.task, args.out, base=args.base, force=args.force)
        print(f"task {args.task} rebuilt -> {args.out}")
        return 0
    lams = args.lams
    if lams is not None and len(lams) != len(args.inputs):
        raise ParamError(f"--lams has {len(lams)} values for {len(args.inputs)} tasks")
    if args.eval_data:
        if lams is not None:
            raise ParamError("give --lams or --eval-data (which chooses them), not both")
        if len(args.eval_data) != len(args.inputs):
            raise ParamError(f"--eval-data needs one text file per task ({len(args.inputs)}), got "
                             f"{len(args.eval_data)}")
        missing = [f for f in args.eval_data if not Path(f).is_file()]
        if missing:
            raise ParamError(f"--eval-data file {missing[0]!r} does not exist")
    _write_tall_store(args.inputs, args.base, args.out, lam=args.lam, lams=lams, force=args.force,
                      eval_data=args.eval_data, candidates=args.candidates)
    return 0


def _write_tall_store(inputs: list[str], base: str | None, out: str, *, lam: float, force: bool, lams=None,
                      eval_data: list[str] | None = None, candidates=None) -> None:
    """Build a TALL store from checkpoints or saved adapters, with λ chosen on ``eval_data`` if given."""
    import tempfile

    from .offline.merge import build_tall, check_output, choose_tall_lams

    check_output(out, force, [*inputs, base])  # before any work
    with tempfile.TemporaryDirectory(prefix="llmgraft-tall-") as scratch:
        models = _tall_task_models(inputs, base, Path(scratch))
        if eval_data:
            from .integrations.transformers.evaluate import text_loss

            lams, scores = choose_tall_lams(base, models, lambda t, model: text_loss(model, eval_data[t]),
                                            candidates=candidates)
            for value, row in scores.items():
                print(f"lambda {value}: validation loss per task {', '.join(f'{v:.4f}' for v in row)}")
        manifest = build_tall(base, models, out, lam=lam, lams=lams, force=force, sources=inputs)
    kept = ", ".join(f"{100 * k:.1f}%" for k in manifest["kept_fraction"])
    print(f"TALL store of {len(inputs)} tasks -> {out} (lambda {manifest['lams']}; mask density {kept})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgraft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmgraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded methods and their parameters").set_defaults(func=cmd_plugins)
    demo = sub.add_parser("demo", help="compare samplers on a real vLLM engine",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("topic", nargs="?", default="top_h", choices=["top_h", "samplers", "merge", "mos", "slim-moe",
                                                                   "distill", "quant"],
                      help="top_h: Top-H against vLLM's top-p and min-p; samplers: a quick sampler lab; merge: "
                           "fine-tunes of the code LM merged by every merger; mos: MoS against LoRA; slim-moe: "
                           "SlimMoE on an MoE; distill: PromptDistill in transformers and vLLM; quant: W4A16 and "
                           "ternary checkpoints in transformers and vLLM")
    demo.add_argument("--out", default="lab-demo", help="samplers topic: where the table and plot go")
    demo.add_argument("--model", help="model directory (default: the bundled code LM)")
    demo.add_argument("--samples", type=int, default=8, help="completions per prompt")
    demo.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    demo.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5], help="sampling temperatures")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.add_argument("--plot", help="also write a PNG bar chart here")
    demo.set_defaults(func=cmd_demo)
    lab = sub.add_parser("lab", help="sweep samplers on a model: quality frontier table and plot",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    lab.add_argument("--model", required=True, help="Hugging Face model directory (safetensors)")
    lab.add_argument("--prompts", required=True,
                     help="prompt file: .json (an array of strings), .jsonl (a string or {\"prompt\": ...} per "
                          "line), or any other text (one prompt per line, \\n for newlines); coherence is "
                          "'parses as Python', so the lab suits code prompts")
    lab.add_argument("--samplers", default=",".join(LAB_SAMPLERS),
                     help="comma-separated: " + ", ".join(LAB_SAMPLERS) + " (top_h sweeps all three variants)")
    lab.add_argument("--out", default="lab", help="output directory for lab.md, frontier.png and lab.json")
    lab.add_argument("--samples", type=int, default=8, help="completions per prompt and point")
    lab.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    lab.add_argument("--temperature", type=float, default=1.0, help="temperature of the knob sweeps")
    lab.add_argument("--quick", action="store_true", help="every other point of each sweep")
    lab.add_argument("--seed", type=int, default=0, help="sampling seed")
    lab.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                     help="engine and replay dtype")
    lab.add_argument("--max-model-len", type=int, default=1024, help="vLLM max_model_len")
    lab.add_argument("--kv-cache-gib", type=float, default=0.25, help="vLLM KV cache size (always size it on a CPU)")
    lab.set_defaults(func=cmd_lab)

    merge = sub.add_parser("merge", help="merge full checkpoints (safetensors), streamed and atomic",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    merge.add_argument("--method", required=True,
                       help="a registered merger: uniform, mwa, task_arithmetic, ties, consensus, or tall (which "
                            "writes a TALL store, as tall build does; see llmgraft plugins)")
    merge.add_argument("--base", help="the base model directory (task-vector methods need it)")
    merge.add_argument("inputs", nargs="+", help="input checkpoint directories, or saved PEFT LoRA adapters")
    merge.add_argument("--out", required=True, help="output model directory")
    merge.add_argument("--set", action="append", metavar="KEY=VALUE", help="a method parameter, e.g. density=0.2")
    merge.add_argument("--losses", type=float, nargs="+", help="per-input loss (mwa; else trainer_state.json)")
    merge.add_argument("--steps", type=float, nargs="+", help="per-input step (mwa; else trainer_state.json)")
    merge.add_argument("--weights", type=float, nargs="+", help="per-input task-vector weights")
    merge.add_argument("--rank", type=int, help="adapters: re-factorise the merged delta to this rank (SVD)")
    merge.add_argument("--into-base", action="store_true", help="adapters: write a full merged model instead")
    merge.add_argument("--force", action="store_true", help="replace an existing output")
    merge.set_defaults(func=cmd_merge)

    tall = sub.add_parser("tall", help="TALL masks: build a compressed multi-task store, rebuild a task")
    tall_sub = tall.add_subparsers(dest="tall_command", required=True)
    build = tall_sub.add_parser("build", help="tau_MTL plus one bit-packed mask per task",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    build.add_argument("--base", required=True, help="the base model directory")
    build.add_argument("inputs", nargs="+", help="one fine-tuned checkpoint per task")
    build.add_argument("--out", required=True, help="the store directory")
    build.add_argument("--lam", type=float, default=0.4, help="mask threshold lambda for every task")
    build.add_argument("--lams", type=float, nargs="+", help="one lambda per task (overrides --lam)")
    build.add_argument("--eval-data", nargs="+", metavar="TEXT",
                       help="one text file per task: choose each task's lambda by its rebuilt model's loss on it")
    build.add_argument("--candidates", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6],
                       help="lambda values tried with --eval-data")
    build.add_argument("--force", action="store_true", help="replace an existing store")
    rebuild = tall_sub.add_parser("rebuild", help="write one task's model from a store")
    rebuild.add_argument("store", help="a store written by llmgraft tall build")
    rebuild.add_argument("--task", type=int, required=True, help="task index (order of build's inputs)")
    rebuild.add_argument("--out", required=True, help="output model directory")
    rebuild.add_argument("--base", help="the base model (default: the one the store records)")
    rebuild.add_argument("--force", action="store_true", help="replace an existing output")
    tall.set_defaults(func=cmd_tall)
    export = sub.add_parser("export-lora", help="a saved llmgraft adapter (MoS) as a plain LoRA adapter (exact)",
                            description="Write each layer's exact factors (A_l, B_l) of a saved llmgraft adapter as "
                                        "a PEFT LoRA adapter that vLLM serves with --enable-lora.")
    export.add_argument("adapter", help="a directory written by save_pretrained of an llmgraft adapter (MoS)")
    export.add_argument("out", help="where the LoRA adapter goes (written atomically)")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.set_defaults(func=cmd_export_lora)
    slim = sub.add_parser("slim-moe", help="SlimMoE: slim every expert of an MoE model (Mixtral, Qwen2-MoE, PhiMoE)",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Prune each expert's intermediate neurons by KD sensitivity and distil from "
                                      "the original, in stages; writes an ordinary checkpoint of the same "
                                      "architecture. An interrupted run resumes at its first unfinished stage.")
    slim.add_argument("--model", required=True, help="the MoE model directory (safetensors)")
    slim.add_argument("--calib", required=True, help="calibration and distillation text file ('stdlib': Python's "
                                                     "standard library)")
    slim.add_argument("--stages", default="0.75,0.5", help="target sizes per stage, as fractions of the current one")
    slim.add_argument("--tokens", type=int, default=32768, help="total distillation tokens, split evenly over stages")
    slim.add_argument("--stage-tokens", help="distillation tokens per stage, comma-separated (overrides --tokens)")
    slim.add_argument("--shared-expert", action="store_true", help="also slim Qwen2-MoE's shared expert")
    slim.add_argument("--importance", default="sensitivity", choices=["sensitivity", "random"],
                      help="how neurons are ranked")
    slim.add_argument("--seed", type=int, default=0, help="data order and random-pruning seed")
    slim.add_argument("--out", required=True, help="output model directory (written atomically)")
    slim.add_argument("--force", action="store_true", help="replace OUT if it exists")
    slim.set_defaults(func=cmd_slim_moe)
    quant = sub.add_parser("quantize", help="write a checkpoint with its linear layers quantized (W4A16, Sherry "
                           "ternary, ...), loadable by vLLM and transformers",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    quant.add_argument("--model", required=True, help="the model directory (safetensors)")
    quant.add_argument("--format", "--scheme", dest="scheme", default="w4a16",
                       help="a registered quant_scheme: w4a16, ternary (llmgraft plugins lists them)")
    quant.add_argument("--group", type=int, default=128, help="input columns per scale (a multiple of 32)")
    quant.add_argument("--modules", help="regex over module names to quantize (default: every *_proj in layers.N)")
    quant.add_argument("--out", required=True, help="output model directory (written atomically)")
    quant.add_argument("--force", action="store_true", help="replace OUT if it exists")
    quant.set_defaults(func=cmd_quantize)
    distill = sub.add_parser("prompt-distill", help="PromptDistill (or another token-retention method) on one "
                             "prompt with transformers, against the full model",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    distill.add_argument("--model", required=True, help="a Llama, Qwen2 or Mistral model directory")
    distill.add_argument("--prompt-file", required=True, help="text file holding the prompt")
    distill.add_argument("--stages", default="1:0.25", help="LAYER:KEEP pairs, comma-separated; KEEP with a "
                         "decimal point is a ratio (0.25, 1.0), without one a token count (64; 1 means one token)")
    distill.add_argument("--method", default="prompt_distill", help="a registered attention method "
                         "(prompt_distill, gemfilter, last_k, ...)")
    distill.add_argument("--param", action="append", help="a method parameter, NAME=VALUE (repeatable)")
    distill.add_argument("--kv-manager", default="keep_kv", help="keep_kv, or truncate_kv to cut earlier layers")
    distill.add_argument("--kv-param", action="append", help="a kv_manager parameter, NAME=VALUE (repeatable)")
    distill.add_argument("--max-prompt-tokens", type=int, help="keep only the prompt's last N tokens")
    distill.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens to generate")
    distill.set_defaults(func=cmd_prompt_distill)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .hooks.errors import LLMGraftError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LLMGraftError as exc:  # a user error: one line, no traceback
        print(f"llmgraft: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
