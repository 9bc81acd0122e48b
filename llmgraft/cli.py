"""The llmgraft command.

    llmgraft plugins                 every loaded method: family, origin, description, parameters
    llmgraft demo [--plot demo.png]  vLLM on the bundled code LM: top-p vs min-p vs Top-H
    llmgraft demo samplers           a quick sampler lab on the bundled code LM (every sampler's frontier)
    llmgraft lab --model DIR --prompts FILE --samplers top_p,min_p,top_h,top_w,top_nsigma,p_less
                                     sweep each sampler's knob on your model: table and frontier plot
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .hooks import FAMILIES, get_registry
from .report import format_table


def cmd_plugins(_args: argparse.Namespace) -> int:
    registry = get_registry()
    print("llmgraft methods")
    for family in FAMILIES:
        for name in registry.names(family):
            entry = registry.entries[family][name]
            print(f"\n{family} {name} from {entry.origin}: {entry.obj.description}")
            rows = [[p["name"], p["type"], repr(p["default"]), p["range"] or "-", p["help"]]
                    for p in entry.obj.params_cls.describe()]
            if rows:
                table = format_table(["parameter", "type", "default", "range", "help"], rows)
                print("\n".join("  " + line for line in table.splitlines()))
    empty = [f for f in FAMILIES if not registry.names(f)]
    if empty:
        print(f"\nfamilies with no method yet: {', '.join(empty)}")
    if registry.load_errors:
        print("\nplugins skipped:")
        for origin, message in registry.load_errors.items():
            print(f"  {origin}: {message}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
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
            max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgraft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmgraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded methods and their parameters").set_defaults(func=cmd_plugins)
    demo = sub.add_parser("demo", help="compare samplers on a real vLLM engine",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("topic", nargs="?", default="top_h", choices=["top_h", "samplers"],
                      help="top_h: Top-H against vLLM's top-p and min-p; samplers: a quick sampler lab")
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
                     help="prompt file: a JSON array of strings, JSON lines, or one prompt per line")
    lab.add_argument("--samplers", default=",".join(LAB_SAMPLERS),
                     help="comma-separated: " + ", ".join(LAB_SAMPLERS) + " (top_h sweeps all three variants)")
    lab.add_argument("--out", default="lab", help="output directory for lab.md, frontier.png and lab.json")
    lab.add_argument("--samples", type=int, default=8, help="completions per prompt and point")
    lab.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    lab.add_argument("--temperature", type=float, default=1.0, help="temperature of the knob sweeps")
    lab.add_argument("--quick", action="store_true", help="every other point of each sweep")
    lab.add_argument("--seed", type=int, default=0, help="sampling seed")
    lab.set_defaults(func=cmd_lab)
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
