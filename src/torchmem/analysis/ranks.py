"""What each rank of a distributed job reports: ``RankSummary`` (no communication here).

``torchmem.distributed.summary()`` gathers them across ranks;
``torchmem.reports.ranks.format_rank_summaries`` prints them.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from .epoch import epoch_results
from .summary import growing_sites

__all__ = ["RankSummary", "rank_summary"]


@dataclass
class RankSummary:
    """What one rank reports (sizes in bytes).

    ``peak_by_type_device`` maps "TYPE:DEVICE" (device -1 = host) to the peak
    bytes of that type on that device; ``leaks`` lists (label, grown or live
    bytes, allocations) of the sites the last epoch check or the growing-site
    heuristic flagged.
    """

    rank: int
    world_size: int
    host: str
    pid: int
    step: int
    current_bytes: int
    peak_bytes: int
    total_allocated_bytes: int
    allocation_count: int
    peak_by_type_device: dict[str, int] = field(default_factory=dict)
    current_by_type: dict[str, int] = field(default_factory=dict)
    leaks: list[tuple[str, int, int]] = field(default_factory=list)
    oom_count: int = 0
    trace_path: str | None = None


def rank_summary(profiler: Any, rank: int = 0, world_size: int = 1,
                 trace_path: str | None = None) -> RankSummary:
    """The RankSummary of ``profiler`` on this process (no communication)."""
    prof = profiler
    prof.poll_sources()
    stats = prof.get_statistics()
    peaks = {f"{type_name}:{device}": int(c.peak_bytes)
             for (type_name, device), c in prof.counters_by_type_and_device().items()}
    results = epoch_results(prof)
    if results and not results[-1].baseline:
        leaks = [(g.site.label, g.grown_bytes, g.new_count) for g in results[-1].leaks[:10]]
    else:
        leaks = [(site.label, nbytes, count)
                 for site, nbytes, count in growing_sites(prof)[:10]]
    return RankSummary(rank, world_size, socket.gethostname(), os.getpid(), prof.current_step,
                       stats.current_usage_bytes, stats.peak_usage_bytes,
                       stats.total_allocated_bytes, stats.allocation_count, peaks,
                       dict(stats.usage_by_type), leaks, len(prof.oom_events), trace_path)
