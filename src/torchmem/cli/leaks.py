"""``torchmem leaks TRACE``: the allocations still live at the end, largest first, with their site;
then the run's epoch checks (saved in the trace): the last that found growth, and who held it."""

from __future__ import annotations

import argparse

from ..analysis.epoch import epoch_records
from ..analysis.epoch_records import format_record
from ..analysis.sites import site_name
from ..units import format_bytes
from ._common import add_top_argument, add_trace_argument, load_trace, non_negative_int


class LeaksCommand:
    """allocations still live at the end of a trace"""

    name = "leaks"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_trace_argument(parser)
        add_top_argument(parser, 20, "how many to show (default 20)")
        parser.add_argument("--min-age-steps", type=non_negative_int, default=0,
                            help="only allocations at least this many steps old (default 0)")

    def run(self, args: argparse.Namespace) -> int:
        prof = load_trace(args.trace)
        rows = prof.potential_leak_rows(min_age_steps=args.min_age_steps)
        total = int(rows["size"].sum(dtype="uint64"))
        print(f"{len(rows):,} allocations live at the end ({format_bytes(total, 1)}), "
              f"at least {args.min_age_steps} steps old; largest first:")
        # Leak objects only for those printed (a negative --top slices as before).
        leaks = prof.detect_potential_leaks(min_age_steps=args.min_age_steps,
                                            top=args.top if args.top >= 0 else None)
        for leak in leaks[:args.top]:
            print(f"\n{format_bytes(leak.size_bytes, 1)} at 0x{leak.address:x}  "
                  f"{site_name(leak.stack_trace)}")
            if leak.stack_trace:
                print(leak.stack_trace.format())
        _print_epoch_checks(prof)
        return 0


def _print_epoch_checks(prof: object) -> None:
    # The run's epoch checks, saved in the trace: what grew, and who held it.
    records = epoch_records(prof)
    grew = [r for r in records if r.get("sites")]
    if not records:
        return
    print(f"\nepoch leak checks: {len(records)} in the run, {len(grew)} found growth"
          + ("" if not grew else "; the last of them:"))
    if grew:
        print("\n".join(format_record(grew[-1])))
        earlier = [str(r.get("index")) for r in grew[:-1]]
        if earlier:
            print(f"(growth also at epoch {', '.join(earlier)})")
