"""Binary layouts shared with the native recorder, and turning rows into objects.

``EVENT_DTYPE`` is the native ``EventRow`` (csrc/event_log.hpp), built from
the trace format's row fields (``_trace_format``, generated from
csrc/trace_format.hpp), and ``LIVE_DTYPE`` the native ``LiveRow``
(csrc/module.cpp), field for field: the recorder hands out bytes and numpy
views them without a per-row copy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence, overload

import numpy as np

from . import _trace_format
from ._recorder import EVENT_ROW_BYTES, LIVE_ROW_BYTES, trace_format
from ._types import MemoryEvent, MemoryEventType, StackTrace

if _trace_format.VALUES != trace_format():
    # A checked-in copy older than the extension would write traces that
    # readers decode wrongly: refuse rather than corrupt.
    raise ImportError("torchmem/_trace_format.py does not match the native module's "
                      "trace_format(): run python scripts/gen_trace_format.py")

#: struct code -> numpy type, for the trace format's field tables.
NUMPY_CODES = {"q": "<i8", "Q": "<u8", "I": "<u4", "H": "<u2", "h": "<i2", "B": "u1",
               "x": "V1"}
EVENT_DTYPE = np.dtype([(name, NUMPY_CODES[code])
                        for name, code in _trace_format.VALUES["row_fields"]])
LIVE_DTYPE = np.dtype(
    [
        ("address", "<u8"),
        ("size", "<u8"),
        ("timestamp_ns", "<i8"),
        ("seq", "<u8"),
        ("stream", "<u8"),
        ("step", "<u4"),
        ("stack_id", "<u4"),
        ("thread_id", "<u4"),
        ("type_id", "<u2"),
        ("device", "<i2"),
        ("context_id", "<u2"),
        ("_pad", "V6"),
    ]
)
STACK_NODE_DTYPE = np.dtype([("parent", "<u4"), ("frame", "<u4")])

assert EVENT_DTYPE.itemsize == EVENT_ROW_BYTES
assert LIVE_DTYPE.itemsize == LIVE_ROW_BYTES

ALLOCATING_KINDS = (int(MemoryEventType.ALLOCATION), int(MemoryEventType.REALLOCATION))


def allocating(kind: np.ndarray) -> np.ndarray:
    """Per event kind (``rows["kind"]``): whether it made an allocation
    (ALLOCATING_KINDS); two compares, cheaper than np.isin on every batch."""
    return (kind == ALLOCATING_KINDS[0]) | (kind == ALLOCATING_KINDS[1])
TYPE_NONE = _trace_format.VALUES["type_none"]  # markers (snapshot, GC) carry no type


MAX_SIZE_BYTES = 2**48 - 1  # the largest size the API takes


def check_event_rows(rows: np.ndarray, n_types: int) -> None:
    """Raises ValueError (one line) unless ``rows`` could have come from a recorder.

    A saved trace is outside data: a row the recorder could never have
    written (an unknown kind, a device below -1, a size no API call takes,
    a type id with no name, seq out of order) is refused before it reaches
    the native replay.
    """
    if not len(rows):
        return
    checks = (
        ("kind", rows["kind"] > max(MemoryEventType)),
        ("device", rows["device"] < -1),
        ("size", (rows["size"] > MAX_SIZE_BYTES) & np.isin(rows["kind"], (0, 1, 2))),
        ("type_id", (rows["type_id"] >= n_types) & (rows["type_id"] != TYPE_NONE)),
    )
    for name, bad in checks:
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"event seq {int(rows['seq'][i])}: impossible {name} "
                             f"{rows[name][i]!r}")
    if len(rows) > 1 and (np.diff(rows["seq"].astype(np.int64)) <= 0).any():
        raise ValueError("event seq numbers are not increasing")


def events_from_bytes(data: bytes) -> np.ndarray:
    """A read-only EVENT_DTYPE array over native event rows."""
    return np.frombuffer(data, dtype=EVENT_DTYPE)


def empty_events() -> np.ndarray:
    return np.zeros(0, dtype=EVENT_DTYPE)


def to_memory_events(
    rows: np.ndarray,
    type_names: Sequence[str],
    resolve_stack: Callable[[int], StackTrace | None],
    details: Callable[[int, int], dict | None],
    resolve_context: Callable[[int], tuple[str, str]] | None = None,
) -> list[MemoryEvent]:
    """Python objects for EVENT_DTYPE rows (in order).

    ``details(kind, address)`` supplies the side record of snapshot, GC and
    OOM events, whose address column holds the record's index;
    ``resolve_context(id)`` the (module, phase) of a context id.
    """
    out = []
    n_types = len(type_names)
    contexts: dict[int, tuple[str, str]] = {0: ("", "other")}
    for r in rows.tolist():
        (_seq, ts, address, size, stream, step, alloc, freed, tid, stack, type_id,
         device, kind, _pad, context) = r
        where = contexts.get(context)
        if where is None:
            where = contexts[context] = (resolve_context(context) if resolve_context
                                         else ("", "other"))
        is_marker = kind in (3, 4, 5, 6)
        out.append(
            MemoryEvent(
                timestamp_ns=ts,
                step=step,
                event_type=MemoryEventType(kind),
                address=0 if is_marker else address,
                size_bytes=size,
                total_allocated_bytes=alloc,
                total_freed_bytes=freed,
                allocation_type=type_names[type_id] if type_id < n_types else "",
                device=device,
                stream=stream,
                thread_id=tid,
                stack_trace=resolve_stack(stack) if stack else None,
                module=where[0],
                phase=where[1],
                details=details(kind, address) if is_marker else None,
            )
        )
    return out


def stack_key_of(rows: np.ndarray) -> np.ndarray:
    """One uint64 per event or live row: stack id, type id and device packed
    together (``torchmem.analysis.sites.site_keys``, the one definition of a
    site, is this; it lives here so that the profiler can group rows too)."""
    return ((rows["stack_id"].astype(np.uint64) << np.uint64(32))
            | (rows["type_id"].astype(np.uint64) << np.uint64(16))
            | ((rows["device"].astype(np.int64) + 1).astype(np.uint64) & np.uint64(0xFFFF)))


def sum_by_key(keys: np.ndarray, sizes: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct keys ascending, bytes, counts) of ``sizes`` grouped by ``keys``,
    as arrays: no Python object per row. Byte sums are exact below 2**53
    bytes (8 PiB: float64 sums, far above any device)."""
    if not len(keys):
        return (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.int64))
    # A sort and a search over the few distinct keys: cheaper than
    # unique(return_inverse=True)'s argsort of every key.
    uniq = np.unique(keys)
    inverse = np.searchsorted(uniq, keys)
    nbytes = np.bincount(inverse, weights=sizes.astype(np.float64), minlength=len(uniq))
    return uniq, nbytes.astype(np.uint64), np.bincount(inverse, minlength=len(uniq)).astype(np.int64)


def merge_key_sums(parts: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]]
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One (keys, bytes, counts) from several ``sum_by_key`` results (batches)."""
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return sum_by_key(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    uniq, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
    nbytes = np.zeros(len(uniq), np.uint64)
    np.add.at(nbytes, inverse, np.concatenate([p[1] for p in parts]))
    counts = np.zeros(len(uniq), np.int64)
    np.add.at(counts, inverse, np.concatenate([p[2] for p in parts]))
    return uniq, nbytes, counts


def allocation_sums(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``sum_by_key`` of the allocating events (allocations, reallocations) of ``rows``."""
    # Columns masked, not the rows: copying whole 80-byte rows cost a third.
    mask = allocating(rows["kind"])
    return sum_by_key(stack_key_of(rows)[mask], rows["size"][mask])


class EventList(Sequence[MemoryEvent]):
    """The answer of an event query: MemoryEvents over EVENT_DTYPE rows, each
    made only when it is read (``rows`` stays a numpy array; iterating makes
    the objects a batch at a time, slicing gives another EventList).

    Compares equal to a list (or EventList) of the same events, in order.
    """

    _BATCH = 4096

    def __init__(self, rows: np.ndarray, make: Callable[[np.ndarray], list[MemoryEvent]]
                 ) -> None:
        self.rows = rows
        self._make = make

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> MemoryEvent: ...
    @overload
    def __getitem__(self, i: slice) -> "EventList": ...

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return EventList(self.rows[i], self._make)
        n = len(self.rows)
        j = i.__index__()
        if j < 0:
            j += n
        if not 0 <= j < n:
            raise IndexError("event index out of range")
        return self._make(self.rows[j:j + 1])[0]

    def __iter__(self) -> Iterator[MemoryEvent]:
        for start in range(0, len(self.rows), self._BATCH):
            yield from self._make(self.rows[start:start + self._BATCH])

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (list, tuple, EventList)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # like list: mutable rows, no hash

    def __repr__(self) -> str:
        if len(self) <= 4:
            return f"EventList({list(self)!r})"
        return f"EventList(<{len(self):,} events>)"
