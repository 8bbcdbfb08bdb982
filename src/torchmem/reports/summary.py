"""The run summary as text: peaks by type and device, top sites, leaks, GC, trace path."""

from __future__ import annotations

from typing import Any

from ..analysis.breakdown import overall_peak
from ..analysis.epoch import epoch_results
from ..analysis.gpu_segments import gpu_allocator_views
from ..analysis.sites import SiteUsage, device_label, merge_by_label
from ..analysis.summary import allocation_sites, growing_sites
from ..units import format_bytes

__all__ = ["format_summary"]


def _labels(sites: list[tuple[Any, int, int]]) -> list[tuple[str, int, int]]:
    return merge_by_label(SiteUsage(site, nbytes, count) for site, nbytes, count in sites)


def _peak_lines(prof: Any, top: int) -> list[str]:
    """The summary's opening: the peak, when, and what was live then by category
    and by module (nothing when the peak's moment is no longer in memory)."""
    try:
        peak = overall_peak(prof, top, storage=False)
    except Exception:  # the summary must come out whatever attribution knows
        peak = None
    if peak is None:
        return []
    modules = ", ".join(f"{k} {format_bytes(v)}" for k, v in list(peak.by_module.items())[:top])
    return [f"torchmem summary: {peak.headline()}", f"  by module at the peak: {modules}"]


def format_summary(profiler: Any, *, trace: str | None = None, max_sites: int = 5) -> str:
    """The at-exit summary of ``profiler`` as text; ``trace`` is the trace path to name."""
    prof = profiler
    stats = prof.get_statistics()
    lines = _peak_lines(prof, max_sites)
    lines.append(f"{'  ' if lines else 'torchmem summary: '}{stats.allocation_count} allocations, "
                 f"{format_bytes(stats.total_allocated_bytes)} allocated in total, "
                 f"{prof.current_step} steps; peak {format_bytes(stats.peak_usage_bytes)}, "
                 f"live now {format_bytes(stats.current_usage_bytes)}")
    for (type_name, device), c in prof.counters_by_type_and_device().items():
        where = device_label(device)
        lines.append(f"  peak {type_name:<8} {where:<9} {format_bytes(c.peak_bytes):>12}"
                     f"   (live now {format_bytes(c.current_bytes)})")
    for v in gpu_allocator_views(prof):
        lines.append(f"  GPU {v.device} torch allocator: {format_bytes(v.allocated_bytes)} allocated "
                     f"of {format_bytes(v.reserved_bytes)} reserved in {v.segment_count} "
                     f"segments; largest free block {format_bytes(v.largest_free_bytes)} of "
                     f"{format_bytes(v.free_bytes)} free (fragmentation "
                     f"{100 * v.fragmentation:.0f}%)")
    sites = _labels(allocation_sites(prof, 1 << 62))[:max_sites]
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
            lines.append("    " + g.format(with_stack=False).replace("\n", "\n  "))
    growing = growing_sites(prof)
    if growing:
        lines.append("  possible leaks (sites holding tensors from 3 or more steps):")
        for label, nbytes, count in _labels(growing)[:max_sites]:
            lines.append(f"    {format_bytes(nbytes):>12} in {count:>7} allocations  {label}")
    elif prof.current_step >= 3 and not results:
        lines.append("  possible leaks: none found")
    if stats.gc_count:
        lines.append(f"  GC: {stats.gc_count} collections, "
                     f"{stats.total_gc_time_ns / 1e6:.1f} ms in total")
    if prof.oom_events:
        lines.append(f"  out-of-memory errors: {len(prof.oom_events)}")
    anomalies = prof.anomalies["total"]
    if anomalies:
        lines.append(f"  anomalies (bad frees etc.): {anomalies}")
    if trace:
        lines.append(f"  trace: {trace}  (torchmem summary {trace})")
    return "\n".join(lines)
