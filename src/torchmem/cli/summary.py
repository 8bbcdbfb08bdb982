"""``torchmem summary TRACE [TRACE...]``: the totals of one or more traces (one per rank)."""

from __future__ import annotations

import argparse

from ._common import load_trace, print_summary, trace_label


class SummaryCommand:
    """totals of one or more traces (e.g. one per rank)"""

    name = "summary"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("traces", nargs="+", metavar="TRACE")

    def run(self, args: argparse.Namespace) -> int:
        profs = [(trace_label(p, prof), prof)
                 for p, prof in ((p, load_trace(p)) for p in args.traces)]
        print_summary(profs)
        return 0
