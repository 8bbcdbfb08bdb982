"""The run summary: peaks by type and device, top allocation sites, possible leaks.

``torchmem.enable()`` prints ``format_summary()`` at exit; ``torchmem
summary TRACE`` prints it for a saved trace.
"""

from __future__ import annotations

import numpy as np

from ..units import format_bytes
from .epoch import Site, epoch_results, live_by_site, top_sites
from ..profiler import MemoryProfiler

__all__ = ["allocation_sites", "format_summary", "growing_sites"]


def _group_rows(prof: MemoryProfiler, rows: np.ndarray) -> list[tuple[Site, int, int]]:
    # Event rows and live rows share the stack_id / type_id / device / size
    # columns, so one grouping serves both.
    return [(u.site, u.bytes, u.count) for u in top_sites(live_by_site(prof, rows), n=1 << 30)]


def allocation_sites(prof: MemoryProfiler, n: int = 5) -> list[tuple[Site, int, int]]:
    """Top ``n`` sites by bytes allocated over the events kept in memory: (site, bytes, count)."""
    from .._events import ALLOCATING_KINDS

    rows = prof._read_rows(prof._first_retained_seq(), prof._next_seq())
    rows = rows[np.isin(rows["kind"], ALLOCATING_KINDS)]
    return _group_rows(prof, rows)[:n]


def growing_sites(prof: MemoryProfiler, min_steps: int = 3) -> list[tuple[Site, int, int]]:
    """Sites still holding allocations made in at least ``min_steps`` different steps.

    A loop that does not leak keeps, at any moment, what the model needs plus
    the last step's tensors; a site that holds tensors from many steps keeps
    them on purpose (a cache) or by mistake (a leak). Returns (site, live
    bytes, live count), largest first.
    """
    from .epoch import _site_keys

    live = prof.live_allocations()
    if not len(live):
        return []
    keys = _site_keys(live)
    # Distinct (site, step) pairs, then pairs per site = steps the site spans.
    pairs = np.unique(np.stack([keys, live["step"].astype(np.uint64)], axis=1), axis=0)
    site_keys, n_steps = np.unique(pairs[:, 0], return_counts=True)
    wanted = set(site_keys[n_steps >= min_steps].tolist())
    if not wanted:
        return []
    return _group_rows(prof, live[np.isin(keys, list(wanted))])


def _by_label(sites: list[tuple[Site, int, int]]) -> list[tuple[str, int, int]]:
    # Stacks that differ only inside torch (the two Linear layers of one
    # model(x) call) are one line of user code: merge them for display.
    merged: dict[str, list[int]] = {}
    for site, nbytes, count in sites:
        m = merged.setdefault(site.label, [0, 0])
        m[0] += nbytes
        m[1] += count
    return sorted(((k, v[0], v[1]) for k, v in merged.items()), key=lambda x: (-x[1], x[0]))


def format_summary(profiler: MemoryProfiler | None = None, *, trace: str | None = None,
                   max_sites: int = 5) -> str:
    """The at-exit summary as text: peaks by type and device, top sites, leaks, trace path."""
    from .. import _session

    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        return "torchmem: not enabled"
    if trace is None and prof is _session.get_profiler():
        trace = _session.trace_path()
    stats = prof.get_statistics()
    names = prof._type_names()
    lines = [f"torchmem summary: {stats.allocation_count} allocations, "
             f"{format_bytes(stats.total_allocated_bytes)} allocated in total, "
             f"{prof.current_step} steps; peak {format_bytes(stats.peak_usage_bytes)}, "
             f"live now {format_bytes(stats.current_usage_bytes)}"]
    devices = [d for d, _ in prof._per_device()]
    for t, _c in prof._per_type():
        for d in sorted(devices):
            c = prof._counters(t, d)
            if c[4]:  # this type was ever allocated on this device
                where = "host" if d < 0 else f"device {d}"
                lines.append(f"  peak {names[t]:<8} {where:<9} {format_bytes(c[3]):>12}"
                             f"   (live now {format_bytes(c[2])})")
    sites = _by_label(allocation_sites(prof, 1 << 30))[:max_sites]
    if sites:
        lines.append("  top allocation sites (bytes allocated):")
        for label, nbytes, count in sites:
            lines.append(f"    {format_bytes(nbytes):>12} in {count:>7} allocations  {label}")
    results = epoch_results(prof)
    if results and not results[-1].baseline:
        last = results[-1]
        lines.append(f"  epoch leak check: {len(last.leaks)} site(s) grew by "
                     f"{format_bytes(last.total_grown_bytes)} in epoch {last.index}")
        for g in last.leaks[:max_sites]:
            lines.append("    " + g.format(with_stack=False))
    growing = growing_sites(prof)
    if growing:
        lines.append("  possible leaks (sites holding tensors from 3 or more steps):")
        for label, nbytes, count in _by_label(growing)[:max_sites]:
            lines.append(f"    {format_bytes(nbytes):>12} in {count:>7} allocations  {label}")
    elif prof.current_step >= 3 and not results:
        lines.append("  possible leaks: none found")
    if stats.gc_count:
        lines.append(f"  GC: {stats.gc_count} collections, "
                     f"{stats.total_gc_time.total_seconds() * 1e3:.1f} ms in total")
    if prof.oom_events:
        lines.append(f"  out-of-memory errors: {len(prof.oom_events)}")
    anomalies = prof.anomalies["total"]
    if anomalies:
        lines.append(f"  anomalies (bad frees etc.): {anomalies}")
    if trace:
        lines.append(f"  trace: {trace}  (torchmem summary {trace})")
    return "\n".join(lines)
