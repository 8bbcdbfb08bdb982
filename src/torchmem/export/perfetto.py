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

``export_perfetto`` streams: it reads the events a batch at a time and
writes each track's JSON to its own temporary file as it goes, then joins
them in the order above, so memory is bounded (a batch, and one running
value per track) and time linear, whatever the trace's size. The file is
byte for byte ``json.dump(to_perfetto(profiler), f, separators=(",", ":"))``.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from typing import IO, Any

import numpy as np

from ._common import OOM, SNAPSHOT, Progress, signed_sizes

__all__ = ["to_perfetto", "export_perfetto"]

_PID = 1
_STEPS_TID, _GC_TID, _MARK_TID = 1, 2, 3
_SEP = (",", ":")


def _device_name(device: int) -> str:
    return "host" if device < 0 else f"cuda:{device}"


def _us(ns: np.ndarray | int, t0: int) -> Any:
    if isinstance(ns, np.ndarray):
        return np.round((ns.astype(np.int64) - t0) / 1000.0, 3)
    return round((int(ns) - t0) / 1000.0, 3)


class _Track:
    """One track's JSON items, written to a temporary file as batches come.

    ``sep`` is what goes before the track's first item: a counter keeps, of
    several samples in one microsecond, the last, so each batch's last
    sample waits for the next batch's first before it is written.
    """

    def __init__(self) -> None:
        self.file: IO[str] = tempfile.TemporaryFile("w+", encoding="utf-8")
        self.empty = True
        self.pending: tuple[float, int] | None = None

    def write(self, items: list[str]) -> None:
        if items:
            self.file.write(("" if self.empty else ",") + ",".join(items))
            self.empty = False

    def counter(self, name_json: str, ts_us: np.ndarray, values: np.ndarray,
                final: bool = False) -> None:
        ts, vs = ts_us.tolist(), values.tolist()
        if self.pending is not None:
            ts.insert(0, self.pending[0])
            vs.insert(0, self.pending[1])
        if not ts:
            return
        self.pending = (ts[-1], vs[-1])
        keep = [(t, v) for t, nt, v in zip(ts, ts[1:], vs) if nt != t]
        if final:
            keep.append(self.pending)
            self.pending = None
        fmt = '{"name":%s,"ph":"C","pid":%d,"ts":%r,"args":{"bytes":%d}}'
        self.write([fmt % (name_json, _PID, t, v) for t, v in keep])

    def finish(self, name_json: str) -> None:
        if self.pending is not None:
            self.counter(name_json, np.zeros(0), np.zeros(0, np.int64), final=True)

    def copy_to(self, out: IO[str], first: bool) -> bool:
        """Appends this track to ``out``; returns whether anything was written."""
        if self.empty:
            return False
        if not first:
            out.write(",")
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        return True

    def close(self) -> None:
        self.file.close()


def write_perfetto(profiler: Any, out: IO[str], progress: Progress = None) -> None:
    """Writes the profiler's trace as Chrome trace JSON to the text stream ``out``
    (see the module doc), reading the events a batch at a time."""
    profiler.flush()
    n_total = max(int(profiler.next_seq), 1)
    t0: int | None = None
    total = _Track()
    groups: dict[tuple[int, int], tuple[_Track, str]] = {}
    running: dict[tuple[int, int], int] = {}
    steps = _Track()
    step_open: tuple[int, float] | None = None  # (step, ts) of the step being read
    last_ts = 0.0
    markers: list[tuple[str, np.ndarray]] = []
    ooms = profiler.oom_events
    done = 0
    try:
        for rows in profiler.iter_event_rows():
            if t0 is None:
                t0 = int(rows["timestamp_ns"][0])
            ts_us = _us(rows["timestamp_ns"], t0)
            delta = signed_sizes(rows)
            memory = delta != 0
            # The totals already carry the usage after each event.
            usage = rows["total_allocated"].astype(np.int64) - rows["total_freed"].astype(np.int64)
            total.counter('"total"', ts_us, usage)
            pairs = np.unique(np.stack([rows["type_id"][memory].astype(np.int64),
                                        rows["device"][memory].astype(np.int64)], axis=1), axis=0)
            for type_id, device in pairs.tolist():
                if (type_id, device) not in groups:
                    name = f"{profiler.type_name(type_id)} {_device_name(device)}"
                    groups[(type_id, device)] = (_Track(), json.dumps(name))
                    running[(type_id, device)] = 0
            for key, (track, name_json) in groups.items():
                mask = memory & (rows["type_id"] == key[0]) & (rows["device"] == key[1])
                if not mask.any():
                    continue
                values = running[key] + np.cumsum(delta[mask])
                running[key] = int(values[-1])
                track.counter(name_json, ts_us[mask], values)
            # Steps: from the first event of a step to the first of the next.
            step = rows["step"]
            first = np.flatnonzero(np.r_[step_open is None or step[0] != step_open[0],
                                         step[1:] != step[:-1]])
            items = []
            for i, s in zip(first.tolist(), ts_us[first].tolist()):
                if step_open is not None:
                    items.append(_step_json(step_open, s))
                step_open = (int(step[i]), s)
            steps.write(items)
            last_ts = float(ts_us[-1])
            for kind, label in ((OOM, "oom"), (SNAPSHOT, "snapshot")):
                sel = rows[rows["kind"] == kind]
                if len(sel):
                    markers.append((label, sel))
            done += len(rows)
            if progress is not None:
                progress(min(done, n_total), n_total)
        if step_open is not None:
            steps.write([_step_json(step_open, last_ts)])
        total.finish('"total"')
        for track, name_json in groups.values():
            track.finish(name_json)
        if progress is not None and done and done < n_total:
            progress(n_total, n_total)
        t0 = t0 or 0
        mark_items = []
        for label in ("oom", "snapshot"):  # every OOM instant, then every snapshot
            for _, sel in (m for m in markers if m[0] == label):
                for row in sel:
                    mark_items.append(json.dumps(_marker(label, row, ooms, t0), separators=_SEP))
        gc_items = [json.dumps({"name": f"gc gen {rec.generation}", "ph": "X", "pid": _PID,
                                "tid": _GC_TID, "ts": _us(rec.start_ns, t0),
                                "dur": round(rec.duration_ns / 1000.0, 3),
                                "args": {"collected": rec.collected,
                                         "uncollectable": rec.uncollectable,
                                         "tensor_bytes_freed": rec.tensor_bytes_freed,
                                         "step": rec.step}}, separators=_SEP)
                    for rec in profiler.gc_records]
        head = [json.dumps(e, separators=_SEP) for e in (
            {"name": "process_name", "ph": "M", "pid": _PID, "args": {"name": "torchmem"}},
            {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _STEPS_TID,
             "args": {"name": "steps"}},
            {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _GC_TID, "args": {"name": "gc"}},
            {"name": "thread_name", "ph": "M", "pid": _PID, "tid": _MARK_TID,
             "args": {"name": "markers"}})]
        out.write('{"traceEvents":[' + ",".join(head))
        for track in [total] + [t for _, (t, _) in sorted(groups.items())] + [steps]:
            track.copy_to(out, first=False)
        for item in mark_items + gc_items:
            out.write("," + item)
        meta = dict(getattr(profiler, "trace_metadata", None) or {})
        other = {"start_time_ns": t0, "producer": "torchmem",
                 **{k: json.dumps(v) if isinstance(v, (dict, list)) else v
                    for k, v in meta.items()}}
        out.write('],"displayTimeUnit":"ms","otherData":' + json.dumps(other, separators=_SEP)
                  + "}")
        if progress is not None and not done:
            progress(0, 0)
    finally:
        for track in [total, steps] + [t for t, _ in groups.values()]:
            track.close()


def _step_json(step_open: tuple[int, float], end: float) -> str:
    step, start = step_open
    return ('{"name":"step %d","ph":"X","pid":%d,"tid":%d,"ts":%r,"dur":%r}'
            % (step, _PID, _STEPS_TID, start, round(max(end - start, 0.0), 3)))


def _marker(label: str, row: np.void, ooms: list, t0: int) -> dict[str, Any]:
    if label == "oom":
        info = ooms[int(row["address"])] if int(row["address"]) < len(ooms) else None
        return {"name": "out of memory", "ph": "i", "s": "g", "pid": _PID,
                "tid": _MARK_TID, "ts": _us(int(row["timestamp_ns"]), t0),
                "args": {"requested_bytes": int(row["size"]),
                         "device": _device_name(int(row["device"])),
                         "device_free_bytes": info.device_free_bytes if info else 0,
                         "device_total_bytes": info.device_total_bytes if info else 0}}
    return {"name": "snapshot", "ph": "i", "s": "g", "pid": _PID, "tid": _MARK_TID,
            "ts": _us(int(row["timestamp_ns"]), t0),
            "args": {"current_usage_bytes": int(row["total_allocated"])
                     - int(row["total_freed"])}}


def to_perfetto(profiler: Any, progress: Progress = None) -> dict[str, Any]:
    """The profiler's trace as a Chrome trace JSON object (see module doc); in
    memory, unlike ``export_perfetto``."""
    text = io.StringIO()
    write_perfetto(profiler, text, progress)
    return json.loads(text.getvalue())


def export_perfetto(profiler: Any, path: str | os.PathLike, progress: Progress = None) -> None:
    """Writes the profiler's trace as Chrome trace JSON to ``path`` (mode 0600),
    streaming (see the module doc)."""
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        write_perfetto(profiler, f, progress)
