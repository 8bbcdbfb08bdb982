"""Export to Chrome trace JSON, which Perfetto (ui.perfetto.dev) and chrome://tracing open.

Mapping (all on process 1, "torchmem"; ``ts`` / ``dur`` in microseconds
since the first event, whose epoch time is ``otherData.start_time_ns``):
- a counter track ("ph": "C") per allocation type and device, named
  ``"<type> <device>"`` (device "host" or "cuda:N"), with ``args.bytes`` the
  bytes of that type live on that device after each event, and one
  ``"total"`` track for everything (several events in the same microsecond
  give one sample, the last);
- a slice ("ph": "X") per training step on thread 1, "steps", from the step's
  first event to the next step's first event;
- a slice per garbage collection on thread 2, "gc", named ``"gc gen N"``,
  with collected / uncollectable objects and the tensor bytes it freed;
- an instant ("ph": "i", global scope) ``"out of memory"`` per OOM, with the
  requested bytes and what the device had free, and ``"snapshot"`` instants.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from ._common import OOM, SNAPSHOT, Progress, all_events, chunks, signed_sizes

__all__ = ["to_perfetto", "export_perfetto"]

_PID = 1
_STEPS_TID, _GC_TID, _MARK_TID = 1, 2, 3


def _device_name(device: int) -> str:
    return "host" if device < 0 else f"cuda:{device}"


def _us(ns: np.ndarray | int, t0: int) -> Any:
    if isinstance(ns, np.ndarray):
        return np.round((ns.astype(np.int64) - t0) / 1000.0, 3)
    return round((int(ns) - t0) / 1000.0, 3)


def _counter(name: str, ts_us: np.ndarray, values: np.ndarray) -> list[dict[str, Any]]:
    # Several events in one microsecond: keep the last value.
    keep = np.ones(len(ts_us), dtype=bool)
    keep[:-1] = ts_us[1:] != ts_us[:-1]
    return [{"name": name, "ph": "C", "pid": _PID, "ts": t, "args": {"bytes": v}}
            for t, v in zip(ts_us[keep].tolist(), values[keep].tolist())]


def to_perfetto(profiler: Any, progress: Progress = None) -> dict[str, Any]:
    """The profiler's trace as a Chrome trace JSON object (see module doc)."""
    events = all_events(profiler)
    t0 = int(events["timestamp_ns"][0]) if len(events) else 0
    out: list[dict[str, Any]] = [
        {"name": "process_name", "ph": "M", "pid": _PID, "args": {"name": "torchmem"}},
        {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _STEPS_TID, "args": {"name": "steps"}},
        {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _GC_TID, "args": {"name": "gc"}},
        {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _MARK_TID,
         "args": {"name": "markers"}},
    ]
    if len(events):
        ts_us = _us(events["timestamp_ns"], t0)
        delta = signed_sizes(events)
        memory = delta != 0
        # The totals already carry the usage after each event.
        total = events["total_allocated"].astype(np.int64) - events["total_freed"].astype(np.int64)
        groups = np.unique(np.stack([events["type_id"][memory].astype(np.int64),
                                     events["device"][memory].astype(np.int64)], axis=1), axis=0)
        out.extend(_counter("total", ts_us, total))
        for start, stop in chunks(len(groups), progress, parts=len(groups) or 1):
            for type_id, device in groups[start:stop].tolist():
                mask = memory & (events["type_id"] == type_id) & (events["device"] == device)
                name = f"{profiler.type_name(type_id)} {_device_name(device)}"
                out.extend(_counter(name, ts_us[mask], np.cumsum(delta[mask])))
        # Steps: from the first event of a step to the first of the next.
        steps = events["step"]
        first = np.flatnonzero(np.r_[True, steps[1:] != steps[:-1]])
        ends = np.r_[ts_us[first[1:]], ts_us[-1]]
        for i, s, e in zip(first.tolist(), ts_us[first].tolist(), ends.tolist()):
            out.append({"name": f"step {int(steps[i])}", "ph": "X", "pid": _PID,
                        "tid": _STEPS_TID, "ts": s, "dur": round(max(e - s, 0.0), 3)})
        ooms = profiler.oom_events
        for row in events[events["kind"] == OOM]:
            info = ooms[int(row["address"])] if int(row["address"]) < len(ooms) else None
            out.append({"name": "out of memory", "ph": "i", "s": "g", "pid": _PID,
                        "tid": _MARK_TID, "ts": _us(int(row["timestamp_ns"]), t0),
                        "args": {"requested_bytes": int(row["size"]),
                                 "device": _device_name(int(row["device"])),
                                 "device_free_bytes": info.device_free_bytes if info else 0,
                                 "device_total_bytes": info.device_total_bytes if info else 0}})
        for row in events[events["kind"] == SNAPSHOT]:
            out.append({"name": "snapshot", "ph": "i", "s": "g", "pid": _PID, "tid": _MARK_TID,
                        "ts": _us(int(row["timestamp_ns"]), t0),
                        "args": {"current_usage_bytes": int(row["total_allocated"])
                                 - int(row["total_freed"])}})
    elif progress is not None:
        progress(0, 0)
    for rec in profiler.gc_records:
        out.append({"name": f"gc gen {rec.generation}", "ph": "X", "pid": _PID, "tid": _GC_TID,
                    "ts": _us(rec.start_ns, t0), "dur": round(rec.duration_ns / 1000.0, 3),
                    "args": {"collected": rec.collected, "uncollectable": rec.uncollectable,
                             "tensor_bytes_freed": rec.tensor_bytes_freed, "step": rec.step}})
    meta = dict(getattr(profiler, "trace_metadata", None) or {})
    return {"traceEvents": out, "displayTimeUnit": "ms",
            "otherData": {"start_time_ns": t0, "producer": "torchmem",
                          **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                             for k, v in meta.items()}}}


def export_perfetto(profiler: Any, path: str | os.PathLike, progress: Progress = None) -> None:
    """Writes ``to_perfetto(profiler)`` as JSON to ``path`` (mode 0600)."""
    data = to_perfetto(profiler, progress)
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, separators=(",", ":"))
