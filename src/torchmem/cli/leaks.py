"""``torchmem leaks TRACE``: the allocations still live at the end, largest first, with their site."""

from __future__ import annotations

import argparse

from ..analysis.sites import site_name
from ..units import format_bytes
from ._common import load_trace


class LeaksCommand:
    """allocations still live at the end of a trace"""

    name = "leaks"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("trace", metavar="TRACE")
        parser.add_argument("--top", type=int, default=20)
        parser.add_argument("--min-age-steps", type=int, default=0)

    def run(self, args: argparse.Namespace) -> int:
        prof = load_trace(args.trace)
        leaks = prof.detect_potential_leaks(min_age_steps=args.min_age_steps)
        total = sum(leak.size_bytes for leak in leaks)
        print(f"{len(leaks):,} allocations live at the end ({format_bytes(total, 1)}), "
              f"at least {args.min_age_steps} steps old; largest first:")
        for leak in leaks[:args.top]:
            print(f"\n{format_bytes(leak.size_bytes, 1)} at 0x{leak.address:x}  "
                  f"{site_name(leak.stack_trace)}")
            if leak.stack_trace:
                print(leak.stack_trace.format())
        return 0
