"""torchmem in a torch.distributed job: one trace per rank, one summary for all.

Each rank runs ``torchmem.enable()`` and records its own trace (the rank is
in the file name, ``...-rank{N}.db``, and in the trace metadata).
``summary()`` gathers every rank's statistics, peaks and leak candidates to
rank 0 through torch.distributed (``all_gather_object``, so any backend:
gloo, nccl, mpi), which prints or returns them. Saved traces of all ranks
merge with ``torchmem summary trace-rank*.db``.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from .analysis.epoch import epoch_results
from .units import format_bytes
from .analysis.summary import growing_sites

__all__ = ["RankSummary", "rank_summary", "summary", "format_rank_summaries"]


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


def rank_summary(profiler: Any = None, rank: int = 0, world_size: int = 1) -> RankSummary:
    """This process's RankSummary (no communication)."""
    from . import _session

    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        raise RuntimeError("torchmem is not enabled on this rank (call torchmem.enable())")
    _session._poll_sources(prof)
    stats = prof.get_statistics()
    names = prof._type_names()
    peaks = {}
    devices = [d for d, _ in prof._per_device()]
    for t, _c in prof._per_type():
        for d in devices:
            c = prof._counters(t, d)
            if c[4]:
                peaks[f"{names[t]}:{d}"] = int(c[3])
    leaks: list[tuple[str, int, int]] = []
    results = epoch_results(prof)
    if results and not results[-1].baseline:
        leaks = [(g.site.label, g.grown_bytes, g.new_count) for g in results[-1].leaks[:10]]
    else:
        leaks = [(site.label, nbytes, count)
                 for site, nbytes, count in growing_sites(prof)[:10]]
    trace = _session.trace_path() if prof is _session.get_profiler() else None
    return RankSummary(rank, world_size, socket.gethostname(), os.getpid(), prof.current_step,
                       stats.current_usage_bytes, stats.peak_usage_bytes,
                       stats.total_allocated_bytes, stats.allocation_count, peaks,
                       dict(stats.usage_by_type), leaks, len(prof.oom_events), trace)


def summary(profiler: Any = None, *, group: Any = None, dst: int = 0, all_ranks: bool = False,
            print_summary: bool = True) -> list[RankSummary] | None:
    """Gathers every rank's RankSummary; a collective: call it on every rank.

    Returns the list (ordered by rank) on rank ``dst`` (on every rank with
    ``all_ranks=True``) and None elsewhere; rank ``dst`` also prints it to
    stderr unless ``print_summary=False``. Outside an initialised process
    group it returns this process's summary alone.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        mine = rank_summary(profiler)
        if print_summary:
            print(format_rank_summaries([mine]), file=sys.stderr)
        return [mine]
    rank = dist.get_rank(group)
    world = dist.get_world_size(group)
    mine = rank_summary(profiler, rank, world)
    gathered: list[Any] = [None] * world
    # all_gather_object works on every backend (gather_object did not on nccl
    # before torch 2.x); the payload is a few hundred bytes per rank.
    dist.all_gather_object(gathered, asdict(mine), group=group)
    out = sorted((RankSummary(**g) for g in gathered), key=lambda s: s.rank)
    for s in out:
        s.leaks = [tuple(x) for x in s.leaks]
    if rank == dst and print_summary:
        print(format_rank_summaries(out), file=sys.stderr)
    return out if (rank == dst or all_ranks) else None


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
