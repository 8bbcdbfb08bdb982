"""What a well-formed side record is: the shapes every report and exporter relies on.

A saved trace's side records (snapshots, GC records, OOM records, anomaly
counts and examples) are JSON and loose SQL columns, so a damaged or hostile
file can hold any value in them. ``MemoryProfiler.from_trace`` keeps the
records these checks accept and skips (and counts) the rest, so nothing
downstream meets a snapshot whose ``usage_by_type`` is a list.
"""

from __future__ import annotations

from typing import Any

from ._types import DeviceMemory, GCRecord, OomEvent, Snapshot

__all__ = ["anomaly_example_ok", "gc_record_ok", "oom_ok", "snapshot_ok", "SIDE_RECORD_KINDS"]

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
