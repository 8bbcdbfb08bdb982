"""The ranks of a distributed job as text: peaks, live bytes and leak candidates per rank."""

from __future__ import annotations

from ..analysis.ranks import RankSummary
from ..units import format_bytes

__all__ = ["format_rank_summaries"]


def format_rank_summaries(summaries: list[RankSummary]) -> str:
    """A table of the ranks' peaks and current usage, then each rank's leaks."""
    lines = [f"torchmem: {len(summaries)} rank(s)"]
    for s in summaries:
        peaks = ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(s.peak_by_type_device.items()))
        lines.append(f"  rank {s.rank} ({s.host}, pid {s.pid}, step {s.step}): peak "
                     f"{format_bytes(s.peak_bytes)}, live {format_bytes(s.current_bytes)}"
                     f"{' [' + peaks + ']' if peaks else ''}"
                     f"{f', {s.oom_count} OOM' if s.oom_count else ''}")
        for label, nbytes, count in s.leaks[:5]:
            lines.append(f"      leak? {format_bytes(nbytes)} in {count} allocations  {label}")
        if s.trace_path:
            lines.append(f"      trace: {s.trace_path}")
    if len(summaries) > 1:
        peaks = [s.peak_bytes for s in summaries]
        lines.append(f"  peak spread across ranks: {format_bytes(min(peaks))} .. "
                     f"{format_bytes(max(peaks))}")
    return "\n".join(lines)
