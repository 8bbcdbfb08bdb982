"""What a well-formed side record is: the shapes every report and exporter relies on.

A saved trace's side records (snapshots, GC records, OOM records, anomaly
counts and examples) are JSON and loose SQL columns, so a damaged or hostile
file can hold any value in them. ``MemoryProfiler.from_trace`` keeps the
records these checks accept and skips (and counts) the rest, so nothing
downstream meets a snapshot whose ``usage_by_type`` is a list; a skipped
record's marker event (GC_END, SNAPSHOT, OUT_OF_MEMORY: its ``address`` is the
record's index) is renumbered to the kept records' places (``keep_records``,
``renumber_markers``).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ._types import DeviceMemory, GCRecord, MemoryEventType, OomEvent, Snapshot

__all__ = ["anomaly_example_ok", "gc_record_ok", "keep_records", "oom_ok", "oom_or_none",
           "renumber_markers", "snapshot_ok", "SIDE_RECORD_KINDS"]

#: The names skipped records are counted under (``profiler.skipped_side_records``).
SIDE_RECORD_KINDS = ("snapshots", "GC records", "OOM records", "anomaly counts",
                     "anomaly examples")
_INT64 = (-2**63, 2**63 - 1)
_DAY_NS = 86_400 * 10**9
_EXAMPLE_INTS = ("address", "size_bytes", "expected_size_bytes", "seq", "timestamp_ns",
                 "thread_id")


def _int(value: Any, lo: int = _INT64[0], hi: int = _INT64[1]) -> bool:
    return type(value) is int and lo <= value <= hi


def _counts(mapping: Any, key_type: type) -> bool:
    return isinstance(mapping, dict) and all(
        type(k) is key_type and _int(v) for k, v in mapping.items())


def _device(d: Any) -> bool:
    return (isinstance(d, DeviceMemory) and _int(d.index, -1) and isinstance(d.name, str)
            and _int(d.total_bytes, 0) and _int(d.used_bytes, 0) and _int(d.free_bytes, 0)
            and (d.process_used_bytes is None or _int(d.process_used_bytes, 0)))


def snapshot_ok(s: Any) -> bool:
    """A Snapshot with int fields, ``{str: int}`` by type, ``{int: int}`` by device,
    and devices None, a reason string, or a list of DeviceMemory."""
    return (isinstance(s, Snapshot) and _int(s.timestamp_ns) and _int(s.step, 0)
            and _int(s.current_usage_bytes, 0) and _int(s.peak_usage_bytes, 0)
            and _counts(s.usage_by_type, str) and _counts(s.usage_by_device, int)
            and (s.devices is None or isinstance(s.devices, str)
                 or (isinstance(s.devices, list) and all(_device(d) for d in s.devices))))


def gc_record_ok(r: Any) -> bool:
    """A GCRecord of ints: a generation Python has (0-2), a pause of 0 to one day
    (a longer one is corruption and would overflow timedelta later)."""
    return (isinstance(r, GCRecord) and r.generation in (0, 1, 2) and type(r.generation) is int
            and _int(r.start_ns) and _int(r.end_ns) and _int(r.duration_ns, 0, _DAY_NS - 1)
            and _int(r.collected, 0) and _int(r.uncollectable, 0)
            and _int(r.tensor_bytes_freed) and _int(r.step, 0))


def oom_ok(o: Any) -> bool:
    """An OomEvent whose fields are ints (sizes >= 0, device >= -1)."""
    return (isinstance(o, OomEvent) and _int(o.seq, 0) and _int(o.timestamp_ns)
            and _int(o.requested_bytes, 0) and _int(o.device, -1) and _int(o.stream, 0)
            and _int(o.device_free_bytes, 0) and _int(o.device_total_bytes, 0)
            and _int(o.live_bytes, 0) and _int(o.stack_id, 0, 2**32 - 1)
            and isinstance(o.extra, dict))


def anomaly_example_ok(e: Any) -> bool:
    """One of ``profiler.anomalies["examples"]``: a kind and int fields."""
    return (isinstance(e, dict) and isinstance(e.get("kind"), str)
            and all(_int(e.get(k)) for k in _EXAMPLE_INTS))


def oom_or_none(o: Any) -> OomEvent | None:
    """A saved OOM record (a dict or an OomEvent) as an OomEvent; None for one of no such shape."""
    try:
        return OomEvent.from_dict(o) if isinstance(o, (dict, OomEvent)) else None
    except (TypeError, ValueError):  # an ``extra`` that is not a mapping
        return None


#: The index a marker event gets when its side record was skipped: past any list.
_NO_RECORD = 2**62


def keep_records(sides: dict[str, list[int]], kept: list, start: int, records: list,
                 ok: Callable[[Any], bool], events: np.ndarray, kind: int,
                 name: str) -> list:
    """``kept`` (the records so far) with ``records`` (the trace's, from index
    ``start``) put in from ``start`` on, those ``ok`` refuses left out. ``sides[name]``
    maps each trace index to its place in the list (-1: skipped); the marker
    events of ``kind`` are renumbered to those places (skipped ones to
    ``_NO_RECORD``)."""
    maps = sides.setdefault(name, [])
    del maps[start:]
    kept = kept[:sum(1 for m in maps if m >= 0)]
    for r in records:
        good = r is not None and ok(r)
        maps.append(len(kept) if good else -1)
        if good:
            kept.append(r)
    if len(kept) != len(maps):  # something skipped: the markers move
        _renumber(events, maps, kind)
    return kept


#: Marker event kinds and the side-record list each points into.
_MARKERS = (("GC records", int(MemoryEventType.GC_END)),
            ("snapshots", int(MemoryEventType.SNAPSHOT)),
            ("OOM records", int(MemoryEventType.OUT_OF_MEMORY)))


def renumber_markers(events: np.ndarray, sides: dict[str, list[int]]) -> np.ndarray:
    """``events`` with their marker indices moved to the kept records' places
    (a copy, when any record was skipped; ``events`` itself otherwise)."""
    moved = [(sides[name], kind) for name, kind in _MARKERS if -1 in sides.get(name, ())]
    if not moved:
        return events
    events = np.array(events, copy=True)
    for maps, kind in moved:
        _renumber(events, maps, kind)
    return events


def _renumber(events: np.ndarray, maps: list[int], kind: int) -> None:
    mapping = np.asarray(maps, np.int64)
    mapping = np.where(mapping >= 0, mapping, _NO_RECORD).astype(np.uint64)
    mask = events["kind"] == kind
    old = events["address"][mask]
    inside = old < len(mapping)
    out = np.full(len(old), _NO_RECORD, np.uint64)
    out[inside] = mapping[old[inside].astype(np.int64)]
    events["address"][mask] = out
