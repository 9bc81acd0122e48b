"""The llmgraft command.

    llmgraft plugins                 every loaded method: family, origin, description, parameters
    llmgraft demo [--plot demo.png]  vLLM on the bundled code LM: top-p vs min-p vs Top-H
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
    from .demo import run_demo

    run_demo(model=args.model, samples=args.samples, max_tokens=args.max_tokens,
             temperatures=tuple(args.temperatures), plot=args.plot, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmgraft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"llmgraft {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("plugins", help="list loaded methods and their parameters").set_defaults(func=cmd_plugins)
    demo = sub.add_parser("demo", help="compare samplers on a real vLLM engine",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    demo.add_argument("--model", help="model directory (default: the bundled code LM)")
    demo.add_argument("--samples", type=int, default=8, help="completions per prompt")
    demo.add_argument("--max-tokens", type=int, default=48, help="tokens per completion")
    demo.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 1.5], help="sampling temperatures")
    demo.add_argument("--seed", type=int, default=0, help="sampling seed")
    demo.add_argument("--plot", help="also write a PNG bar chart here")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
