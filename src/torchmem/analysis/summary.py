"""What the run summary reports: the top allocation sites and the sites that keep growing.

The text is ``torchmem.reports.summary.format_summary``; ``torchmem.enable()``
prints it at exit and ``torchmem summary TRACE`` for a saved trace.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .breakdown import model_state
from .sites import Site, group_by_site, group_stack_sums, site_keys, top_sites

__all__ = ["allocation_sites", "growing_sites"]


def _group_rows(profiler: Any, rows: np.ndarray) -> list[tuple[Site, int, int]]:
    # Event rows and live rows share the stack_id / type_id / device / size
    # columns, so one grouping serves both.
    return [(u.site, u.bytes, u.count)
            for u in top_sites(group_by_site(profiler, rows), n=1 << 62)]


def allocation_sites(profiler: Any, n: int = 5) -> list[tuple[Site, int, int]]:
    """Top ``n`` sites by bytes allocated over the events kept in memory (a loaded
    trace: all of them): (site, bytes, count)."""
    usage = group_stack_sums(profiler, *profiler.allocation_totals_by_stack())
    return [(u.site, u.bytes, u.count) for u in top_sites(usage, n=n)]


def growing_sites(profiler: Any, min_steps: int = 3) -> list[tuple[Site, int, int]]:
    """Sites still holding allocations made in at least ``min_steps`` different steps.

    A loop that does not leak keeps, at any moment, what the model needs plus
    the last step's tensors; a site that holds tensors from many steps keeps
    them on purpose (a cache) or by mistake (a leak). Parameters, buffers,
    gradients and optimizer state (alive by design: a .grad kept with
    zero_grad(set_to_none=False) spans every step) are left out. Returns
    (site, live bytes, live count), largest first.
    """
    live = profiler.live_allocations()
    if not len(live):
        return []
    live = live[~model_state(profiler, live)]
    if not len(live):
        return []
    keys = site_keys(profiler, live)
    # Distinct (site, step) pairs, then pairs per site = steps the site spans.
    pairs = np.unique(np.stack([keys, live["step"].astype(np.uint64)], axis=1), axis=0)
    keys_seen, n_steps = np.unique(pairs[:, 0], return_counts=True)
    wanted = keys_seen[n_steps >= min_steps]
    if not len(wanted):
        return []
    return _group_rows(profiler, live[np.isin(keys, wanted)])
