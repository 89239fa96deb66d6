"""`ademvl <command>`: every command lives in its own module, which adds its parser here.

Each module listed in COMMANDS has `add_parser(subparsers)` that registers one sub-command and
sets `func` (called with the parsed args, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "ademvl.commands",  # params, generate
    "ademvl.train",  # train
    "ademvl.evaluate",  # eval scienceqa|coco|mme
    "ademvl.score",  # score scienceqa|coco|mme
    "ademvl.tasks.shapes",  # data synth-shapes
    "ademvl.bench",  # bench
    "ademvl.demo",  # demo
    "ademvl.web",  # serve
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ademvl", description="ADEM-VL: teach a frozen LLM to see, cheaply.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "accepts_overrides", False):  # only `train` takes --section.key overrides
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.overrides = extra
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as e:  # bad input: say what and how to fix, no traceback
        print(f"ademvl {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
