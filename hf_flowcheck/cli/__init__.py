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
        print(f"flowcheck {args.command}: error: {_describe(err)}", file=sys.stderr)
        return 2


def _describe(err: BaseException) -> str:
    """One line for a user error; an OS error names the path, what is wrong with it, and the fix."""
    if isinstance(err, OSError) and err.filename and err.strerror:
        kind = {
            FileExistsError: "it exists and is not what this command writes there",
            IsADirectoryError: "it is a folder where a file is needed",
            NotADirectoryError: "it is a file where a folder is needed",
        }.get(type(err), err.strerror.lower())
        return f"{err.filename}: {kind}; pass another path."
    return str(err)
