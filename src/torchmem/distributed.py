"""torchmem in a torch.distributed job: one trace per rank, one summary for all.

Each rank runs ``torchmem.enable()`` and records its own trace (the rank is
in the file name, ``...-rank{N}.db``, and in the trace metadata).
``summary()`` gathers every rank's statistics, peaks and leak candidates to
rank 0 through torch.distributed (``all_gather_object``, so any backend:
gloo, nccl, mpi), which prints or returns them. Saved traces of all ranks
merge with ``torchmem summary trace-rank*.db``.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from . import _session
from .analysis import ranks as _ranks
from .analysis.ranks import RankSummary
from .reports.ranks import format_rank_summaries

__all__ = ["RankSummary", "rank_summary", "summary", "format_rank_summaries"]


def rank_summary(profiler: Any = None, rank: int = 0, world_size: int = 1) -> RankSummary:
    """This process's RankSummary (no communication); ``profiler`` defaults to the
    session's (RuntimeError when torchmem is not enabled on this rank)."""
    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        raise RuntimeError("torchmem is not enabled on this rank (call torchmem.enable())")
    trace = _session.trace_path() if prof is _session.get_profiler() else None
    return _ranks.rank_summary(prof, rank, world_size, trace)


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
