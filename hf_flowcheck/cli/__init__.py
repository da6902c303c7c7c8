"""The ``flowcheck`` command: thin over the library and :mod:`hf_flowcheck.workflows`.

``generation`` holds the commands that generate with flow checking (``demo``, ``generate``,
``report``), ``research`` the dataset and training workflows, ``options`` what they share.
"""

from __future__ import annotations

import argparse
import sys

from hf_flowcheck.cli.options import DTYPES, USER_ERRORS, positive_int, unit_interval

__all__ = ["DTYPES", "USER_ERRORS", "build_parser", "main", "positive_int", "unit_interval"]


def build_parser() -> argparse.ArgumentParser:
    """The ``flowcheck`` parser with every subcommand."""
    from hf_flowcheck.cli import generation, research

    parser = argparse.ArgumentParser(prog="flowcheck", description="Flow signatures for HuggingFace causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)
    generation.register(sub)
    research.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``flowcheck`` command; a user error prints one line and returns 2, never a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        print(f"flowcheck {args.command}: error: {err}", file=sys.stderr)
        return 2
