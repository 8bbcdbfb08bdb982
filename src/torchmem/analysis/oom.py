"""What an out-of-memory report says: the failed request, the device, what was live and where from.

``build_report(profiler, error, oom)`` gathers it as a dict (sizes in bytes,
times in seconds): the failed request (from the OUT_OF_MEMORY event, or the
error's message), the device totals (from the event and NVML), allocated vs
reserved bytes where the allocator says (the difference is memory the
allocator holds but cannot hand out: fragmentation or cache), the live
allocations grouped by site, the last seconds of the timeline, and the
garbage collector's state. ``torchmem.reports.oom`` renders it as text and
``torchmem.export.oom_html`` as HTML; ``torchmem.oom`` writes both when an
out-of-memory error happens.
"""

from __future__ import annotations

import gc
import os
import re
import time
from typing import Any

import numpy as np

from .._types import OomEvent
from ..units import parse_bytes
from .breakdown import breakdown, breakdown_at, context_of_event
from .gc_problems import find_gc_problems
from .gpu_segments import oom_segment_view
from .sites import group_by_site, top_sites

__all__ = ["build_report", "is_oom_error", "requested_from_message"]

_SIZE_RE = re.compile(r"[Tt]ried to allocate ([0-9.]+) ?([KMGTP]i?B|bytes|B)")


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error from torch (any device)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def requested_from_message(message: str) -> int | None:
    """The bytes an OOM message says were requested ("Tried to allocate 2.00 GiB"), or None."""
    m = _SIZE_RE.search(message)
    if not m:
        return None
    return parse_bytes(f"{m.group(1)} {m.group(2)}")


def _allocator_view(device: int | None) -> dict[str, Any]:
    """Allocated vs reserved bytes on ``device`` from whoever allocates there."""
    if device is None or device < 0:
        return {}
    try:
        from .. import cuda

        if cuda.is_installed():
            st = cuda.plugin_stats(device)
            return {"source": "torchmem plugin", "allocated": st["current"],
                    "reserved": st["reserved"]}
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"source": "torch caching allocator",
                    "allocated": int(torch.cuda.memory_allocated(device)),
                    "reserved": int(torch.cuda.memory_reserved(device))}
    except Exception:
        pass
    return {}


def _timeline(prof: Any, window_s: float) -> dict[str, Any]:
    rows = prof.read_rows(since_ns=time.time_ns() - int(window_s * 1e9))
    kinds = rows["kind"]
    usage = rows["total_allocated"].astype(np.int64) - rows["total_freed"].astype(np.int64)
    data = {"window_s": window_s, "events": int(len(rows)),
            "allocations": int(np.count_nonzero(kinds == 0)),
            "frees": int(np.count_nonzero(kinds == 1)),
            "bytes_allocated": int(rows["size"][kinds == 0].sum()) if len(rows) else 0,
            "points": []}
    if len(rows):
        # At most ~400 points: enough for a chart, small enough for a report.
        stride = max(1, len(rows) // 400)
        t0 = int(rows["timestamp_ns"][0])
        data["points"] = [((int(t) - t0) / 1e9, int(u)) for t, u in
                          zip(rows["timestamp_ns"][::stride], usage[::stride])]
        data["points"].append(((int(rows["timestamp_ns"][-1]) - t0) / 1e9, int(usage[-1])))
        data["last"] = [(int(r["timestamp_ns"]), int(r["kind"]), int(r["size"]),
                         prof.type_name(int(r["type_id"])), int(r["device"]))
                        for r in rows[-15:]]
    return data


def _gc_state(prof: Any) -> dict[str, Any]:
    records = prof.gc_records
    try:
        problems = [str(p) for p in find_gc_problems(prof)]
    except Exception as exc:
        problems = [f"(could not check: {exc!r})"]
    return {"enabled": gc.isenabled(), "counts": gc.get_count(), "thresholds": gc.get_threshold(),
            "collections": len(records),
            "last": [(r.generation, r.duration_ns / 1e6, r.collected, r.tensor_bytes_freed)
                     for r in records[-5:]],
            "problems": problems}


def build_report(profiler: Any, error: BaseException | None = None,
                 oom: OomEvent | None = None, *, window_s: float = 5.0,
                 max_sites: int = 10) -> dict[str, Any]:
    """The report's content as a dict (sizes in bytes, times in seconds).

    ``device`` is the failed request's device (-1: host), or None when only
    an error message is known (the live allocations of every device are
    then listed).
    """
    prof = profiler
    if oom is not None and not isinstance(oom, OomEvent):
        oom = OomEvent.from_dict(oom)
    message = str(error) if error is not None else ""
    requested = oom.requested_bytes if oom else requested_from_message(message)
    device = int(oom.device) if oom else None
    data: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
        "step": prof.current_step, "error": f"{type(error).__name__}: {message}" if error else None,
        "requested": requested, "device": device, "oom": oom.as_dict() if oom else None,
    }
    if oom and oom.stack_id:
        data["oom_stack"] = prof.resolve_stack(int(oom.stack_id))
    stats = prof.get_statistics()
    data["tracked"] = {"current": stats.current_usage_bytes, "peak": stats.peak_usage_bytes,
                       "by_type": stats.usage_by_type, "by_device": stats.usage_by_device}
    data["allocator"] = _allocator_view(device)
    data["segments"] = oom_segment_view(prof, device, requested)
    try:
        from ..sources.nvml import query_devices

        data["nvml"] = query_devices()
    except Exception as exc:
        data["nvml"] = f"unavailable: {exc}"
    usage = group_by_site(prof)
    on_device = {k: u for k, u in usage.items() if u.site.device == device}
    data["sites_scope"] = (f"device {device}" if on_device and device >= 0 else
                           "host" if on_device else "all devices")
    data["sites"] = top_sites(on_device or usage, max_sites)
    data["live_total"] = sum(u.bytes for u in (on_device or usage).values())
    data["live_count"] = sum(u.count for u in (on_device or usage).values())
    data["timeline"] = _timeline(prof, window_s)
    data["gc"] = _gc_state(prof)
    data["attribution"] = _attribution(prof, oom, device)
    return data


def _attribution(prof: Any, oom: OomEvent | None, device: int | None) -> dict[str, Any]:
    """What was live at the failure by category, module and phase (on the failed
    request's device), and the module and phase that asked: the moment right
    after the OUT_OF_MEMORY event, else now."""
    try:
        if oom is not None and oom.seq is not None:
            out = {by: breakdown_at(prof, int(oom.seq), by, device)
                   for by in ("category", "module", "phase")}
            module, phase = context_of_event(prof, int(oom.seq))
        else:
            out = {by: breakdown(prof, by, "now", device) for by in ("category", "module", "phase")}
            module, phase = "", "other"
        return {"by_category": out["category"], "by_module": out["module"],
                "by_phase": out["phase"], "running_module": module, "running_phase": phase}
    except Exception as exc:  # a report must come out whatever attribution knows
        return {"error": f"{type(exc).__name__}: {exc}"}
