"""``torchmem diff TRACE_A TRACE_B``: per-site growth of live bytes from one trace to another."""

from __future__ import annotations

import argparse
import sys

from ..analysis.sites import bytes_by_site_name
from ..units import format_bytes
from ._common import add_top_argument, load_trace, print_table


class DiffCommand:
    """per-site growth of live bytes from TRACE_A to TRACE_B"""

    name = "diff"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("trace_a", metavar="TRACE_A")
        parser.add_argument("trace_b", metavar="TRACE_B")
        add_top_argument(parser, 20)

    def run(self, args: argparse.Namespace) -> int:
        a, b = load_trace(args.trace_a), load_trace(args.trace_b)
        la, lb = bytes_by_site_name(a), bytes_by_site_name(b)
        rows = []
        for site in set(la) | set(lb):
            (ba, ca, _), (bb, cb, _) = la.get(site, (0, 0, 0)), lb.get(site, (0, 0, 0))
            if ba != bb or ca != cb:
                rows.append((bb - ba, site, ba, bb, cb - ca))
        rows.sort(key=lambda r: (-r[0], r[1]))
        sa, sb = a.get_statistics(), b.get_statistics()
        grown = sb.current_usage_bytes - sa.current_usage_bytes
        print(f"live at end: {format_bytes(sa.current_usage_bytes, 1)} -> "
              f"{format_bytes(sb.current_usage_bytes, 1)} "
              f"({'+' if grown >= 0 else '-'}{format_bytes(abs(grown), 1)}); peak "
              f"{format_bytes(sa.peak_usage_bytes, 1)} -> {format_bytes(sb.peak_usage_bytes, 1)}")
        if not rows:
            print("no per-site change in live bytes")
            return 0
        print_table(["site", "growth", "live in A", "live in B", "count change"],
                    [(site, ("+" if g >= 0 else "-") + format_bytes(abs(g), 1),
                      format_bytes(x, 1), format_bytes(y, 1), f"{dc:+,}")
                     for g, site, x, y, dc in rows[:args.top]],
                    sys.stdout)
        return 0
