"""Epoch checks as plain records: kept in the trace, read back by ``torchmem leaks`` and the HTML report.

A live profiler's checks are in its epoch state; a saved trace has no such
state, so every check is also written into the trace's run metadata (key
``epoch_checks``, a JSON list, the newest ``MAX_RECORDS``) through the
profiler's storage, which stores metadata keys as they come (``open`` adds or
replaces keys). A record holds what a report shows: the sites that grew, with
their labels, bytes, counts and holders, and the holder search's note.
"""

from __future__ import annotations

from typing import Any

from ..units import format_bytes
from .holders import Holder

__all__ = ["MAX_RECORDS", "MAX_SITES", "METADATA_KEY", "format_record", "int_field",
           "record_of", "store_records", "trace_records"]

METADATA_KEY = "epoch_checks"
#: Checks kept in a trace (the newest).
MAX_RECORDS = 100
#: Growing sites kept per check (the largest).
MAX_SITES = 10


def record_of(result: Any) -> dict[str, Any]:
    """An EpochResult as a JSON-able dict."""
    search = result.holder_search
    return {
        "index": result.index,
        "step": result.step,
        "baseline": result.baseline,
        "live_bytes": result.live_bytes,
        "live_count": result.live_count,
        "total_grown_bytes": result.total_grown_bytes,
        "site_count": len(result.leaks),
        "sites": [{
            "site": g.site.label,
            "grown_bytes": g.grown_bytes,
            "bytes_before": g.bytes_before, "bytes_after": g.bytes_after,
            "count_before": g.count_before, "count_after": g.count_after,
            "holders": [{"path": h.path, "held_bytes": h.held_bytes,
                         "allocation_count": h.allocation_count, "root_kind": h.root_kind}
                        for h in g.holders],
        } for g in result.leaks[:MAX_SITES]],
        "holder_search": None if search is None else {
            "note": search.note(), "stopped_early": search.stopped_early,
            "error": search.error},
    }


def store_records(profiler: Any, results: list[Any]) -> None:
    """Writes the records of ``results`` into ``profiler``'s trace, if it has a storage.

    Never raises: a storage that cannot take them leaves the trace without
    them (the live profiler still has every check).
    """
    storage = getattr(profiler, "storage", None)
    add = getattr(storage, "open", None)
    if add is None:
        return
    try:
        add({METADATA_KEY: [record_of(r) for r in results[-MAX_RECORDS:]]})
    except Exception:  # pragma: no cover - a storage's own failure, reported by it
        pass


def trace_records(profiler: Any) -> list[dict[str, Any]] | None:
    """The records a loaded trace keeps (its ``trace_metadata``), or None for a
    profiler without them (``analysis.epoch.epoch_records`` then gives the live ones)."""
    meta = getattr(profiler, "trace_metadata", None)
    if isinstance(meta, dict) and isinstance(meta.get(METADATA_KEY), list):
        return [r for r in meta[METADATA_KEY] if isinstance(r, dict)]
    return None


def format_record(record: dict[str, Any]) -> list[str]:
    """Text lines for one record: the growth, each site and its holders (fields of the
    wrong type, from a damaged trace, read as 0 or are skipped)."""
    sites = record.get("sites") or []
    sites = [s for s in sites if isinstance(s, dict)] if isinstance(sites, list) else []
    count = record.get("site_count")
    def size(d: dict, key: str) -> str:
        return format_bytes(int_field(d.get(key)))

    lines = [f"epoch {int_field(record.get('index'))}: "
             f"{count if type(count) is int else len(sites)} allocation site(s) grew by "
             f"{size(record, 'total_grown_bytes')} ({size(record, 'live_bytes')} live)"]
    for s in sites:
        lines.append(f"  +{size(s, 'grown_bytes')} (live {size(s, 'bytes_before')} -> "
                     f"{size(s, 'bytes_after')}, {int_field(s.get('count_before'))} -> "
                     f"{int_field(s.get('count_after'))} allocations)  {s.get('site')}")
        for h in s.get("holders") or []:
            if isinstance(h, dict):
                holder = Holder(str(h.get("path")), int_field(h.get("held_bytes")),
                                int_field(h.get("allocation_count")), str(h.get("root_kind", "")))
                lines.append("    held by: " + holder.format())
    search = record.get("holder_search")
    if isinstance(search, dict) and (search.get("stopped_early") or search.get("error")):
        lines.append(f"  ({search.get('note')})")
    return lines


def int_field(value: Any) -> int:
    """``value`` if it is an int, else 0: records come from a trace file, maybe damaged."""
    return value if type(value) is int else 0
