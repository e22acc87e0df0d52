"""The `tokenomy` command. Each subcommand registers itself through `add_parser(subparsers)`."""
from __future__ import annotations

import argparse
import importlib
import sys

# module path -> provides `add_parser(subparsers)`; a subcommand whose module is absent is skipped.
SUBCOMMAND_MODULES = [
    "tokenomy.vlm.cli",
    "tokenomy.eval.cli",
    "tokenomy.generation.cli",
    "tokenomy.train.cli",
    "tokenomy.demo.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenomy", description="Cheaper vision-language models: token reducers, evaluation, generation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from tokenomy.errors import TokenomyError

    try:
        return int(args.func(args) or 0)
    except TokenomyError as exc:
        print(f"tokenomy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
