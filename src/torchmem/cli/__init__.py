"""The ``torchmem`` command: run a script under the profiler, then summarise, diff and export traces.

    torchmem run [-o TRACE] [--no-stacks] [--live] SCRIPT [ARGS...]
    torchmem live TRACE [--interval S] [--top N] [--once]
    torchmem summary TRACE [TRACE...]
    torchmem leaks TRACE [--top N] [--min-age-steps K]
    torchmem export TRACE --format memory_viz|perfetto|html|tensorboard -o OUT
    torchmem diff TRACE_A TRACE_B [--top N]

One module per verb, each a ``Command`` (below); ``main`` builds the parser
from ``COMMANDS`` and runs the one asked for. A missing, foreign, corrupt or
truncated trace gives a one-line error on stderr and exit status 2.
docs/cli.md has examples.
"""

from __future__ import annotations

import argparse
import sys
from typing import Protocol, Sequence

from ..storage.base import TraceFormatError
from ._common import EXIT_BAD_TRACE, EXIT_INTERRUPTED, CliError, print_summary
from .diff import DiffCommand
from .export import ExportCommand
from .leaks import LeaksCommand
from .live import LiveCommand
from .run import RunCommand
from .summary import SummaryCommand

__all__ = ["COMMANDS", "Command", "CliError", "build_parser", "main", "print_summary"]


class Command(Protocol):
    """One verb of the command line: its ``name``, its help (the class
    docstring), its arguments, and what it does (returning the exit status)."""

    name: str

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        ...

    def run(self, args: argparse.Namespace) -> int:
        ...


COMMANDS: list[Command] = [RunCommand(), LiveCommand(), SummaryCommand(), LeaksCommand(),
                           ExportCommand(), DiffCommand()]


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The argument parser with a subcommand per ``Command``."""
    p = argparse.ArgumentParser(prog="torchmem", description="Memory profiler for PyTorch training.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        doc = (type(command).__doc__ or "").strip()
        parser = sub.add_parser(command.name, help=doc, description=doc)
        command.add_arguments(parser)
        parser.set_defaults(run=command.run)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchmem`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (TraceFormatError, CliError) as exc:
        print(f"torchmem: error: {exc}", file=sys.stderr)
        return EXIT_BAD_TRACE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
