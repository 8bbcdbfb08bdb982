"""What the verbs share: loading a trace, the error a user sees, tables, the summary table."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, Sequence

from ..storage import load
from ..units import format_bytes

__all__ = ["EXIT_BAD_TRACE", "EXIT_INTERRUPTED", "CliError", "add_top_argument",
           "add_trace_argument", "load_trace", "non_negative_int", "print_summary", "print_table",
           "trace_label"]

#: Exit status of a user error (a bad trace, a bad argument): one line on stderr.
EXIT_BAD_TRACE = 2
#: Exit status after Ctrl-C: what a shell reports for a process SIGINT ended (128 + 2).
EXIT_INTERRUPTED = 130


class CliError(Exception):
    """A user error reported as one line, exit status 2."""


def non_negative_int(text: str) -> int:
    """argparse type: an int >= 0 (argparse then reports anything else as a usage error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_trace_argument(parser: argparse.ArgumentParser) -> None:
    """The one positional ``TRACE`` (a trace file's path) of a verb that reads one trace."""
    parser.add_argument("trace", metavar="TRACE")


def add_top_argument(parser: argparse.ArgumentParser, default: int, help: str | None = None,
                     type: Callable[[str], int] = non_negative_int) -> None:
    """``--top N``: how many rows (sites, allocations) a verb shows."""
    parser.add_argument("--top", type=type, default=default, help=help)


def load_trace(path: str) -> Any:
    """The saved trace at ``path`` as a read-only profiler (TraceFormatError if unreadable)."""
    return load(path)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: Any) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for k, row in enumerate(cells):
        # First column left-aligned (names), numbers right-aligned.
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths))).rstrip(), file=out)
        if k == 0:
            print("  ".join("-" * w for w in widths), file=out)


def _summary_row(name: str, prof: Any) -> list[Any]:
    s = prof.get_statistics()
    live = prof.live_allocations()
    return [name, f"{prof.next_seq:,}", format_bytes(s.total_allocated_bytes, 1),
            format_bytes(s.peak_usage_bytes, 1), format_bytes(s.current_usage_bytes, 1),
            f"{s.allocation_count:,}", f"{s.deallocation_count:,}", f"{len(live):,}",
            f"{s.gc_count} / {s.total_gc_time_ns / 1e6:.1f} ms",
            prof.anomalies["total"]]


_SUMMARY_HEADERS = ["trace", "events", "allocated", "peak", "live at end", "allocs", "frees",
                    "live count", "GC (count / time)", "anomalies"]


def print_summary(profilers: Sequence[tuple[str, Any]], out: Any = None) -> None:
    """Prints the summary table of one or more profilers (one row each, plus merged totals)."""
    out = out if out is not None else sys.stdout
    rows = [_summary_row(name, p) for name, p in profilers]
    if len(profilers) > 1:
        stats = [p.get_statistics() for _, p in profilers]
        rows.append([
            "all (merged)", f"{sum(p.next_seq for _, p in profilers):,}",
            format_bytes(sum(s.total_allocated_bytes for s in stats), 1),
            f"{format_bytes(sum(s.peak_usage_bytes for s in stats), 1)} (sum of peaks)",
            format_bytes(sum(s.current_usage_bytes for s in stats), 1),
            f"{sum(s.allocation_count for s in stats):,}",
            f"{sum(s.deallocation_count for s in stats):,}",
            f"{sum(len(p.live_allocations()) for _, p in profilers):,}",
            f"{sum(s.gc_count for s in stats)} / "
            f"{sum(s.total_gc_time_ns for s in stats) / 1e6:.1f} ms",
            sum(p.anomalies["total"] for _, p in profilers)])
    print_table(_SUMMARY_HEADERS, rows, out)
    by_type: dict[str, int] = {}
    for _, p in profilers:
        for t, v in p.get_statistics().usage_by_type.items():
            by_type[t] = by_type.get(t, 0) + v
    if by_type:
        print("live at end by type: " + ", ".join(f"{t} {format_bytes(v, 1)}"
                                                  for t, v in sorted(by_type.items())), file=out)
    counts: dict[str, int] = {}
    for _, p in profilers:
        for kind, n in p.anomalies["counts"].items():
            counts[kind] = counts.get(kind, 0) + n
    if any(counts.values()):
        print("anomalies: " + ", ".join(f"{k} {n:,}" for k, n in counts.items() if n)
              + " (bad frees or allocations the recorder counted; see docs/bad-input.md)",
              file=out)


def trace_label(path: str, prof: Any) -> str:
    rank = (getattr(prof, "trace_metadata", None) or {}).get("rank")
    return f"{path} (rank {rank})" if rank is not None else path
