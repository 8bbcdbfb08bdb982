"""Attribution contexts and marks: resolving context ids, the mark vocabulary.

Every event carries a context id (csrc/context_table.hpp): the module path
running on its thread and the phase (``other``, ``forward``, ``backward``,
``optimizer``), interned once per process like stacks. Marks are what the
context source (torchmem.sources.context) learns about allocations from
torch's objects: that the storage at an address is a parameter, a buffer, a
gradient, optimizer state or an input, and when a backward pass starts. A
mark is ``(seq, address, category, context_id)``: it holds from the moment
the profiler had recorded ``seq`` events; its context names the owning
module. torchmem.analysis turns contexts, marks and lifetimes into
categories.
"""

from __future__ import annotations

from operator import index as _index
from typing import Sequence

import numpy as np

from . import _recorder, _trace_format

#: Phase names by index (the phase byte of a context).
PHASES: tuple[str, ...] = tuple(_trace_format.VALUES["phases"])
PHASE_INDEX = {name: i for i, name in enumerate(PHASES)}

#: Categories a mark can give. "none" withdraws an earlier mark (the storage
#: is no longer, say, a .grad); "backward_start" (address 0) is a moment.
MARK_CATEGORIES: tuple[str, ...] = ("none", "parameter", "buffer", "gradient",
                                    "optimizer_state", "input", "backward_start")
MARK_INDEX = {name: i for i, name in enumerate(MARK_CATEGORIES)}
MARK_DTYPE = np.dtype([("seq", "<u8"), ("address", "<u8"), ("category", "u1"),
                       ("context_id", "<u2")])


class MarkLog:
    """Marks in arrival order, 19 bytes each (a run marks each new .grad storage
    every step: as many marks as such allocations, so no Python tuple per mark
    is kept). The latest, up to ``PENDING`` of them, wait as tuples: a numpy
    array per append cost more than the marks (a few per step).

    A live run with a storage that reads marks back lets the stored ones
    leave memory (``release``): ~5 marks a step made 95 bytes a step, the
    training process's one grower (issue 12). What is held then is the
    marks from ``first`` on, plus ``kept``: the released marks on
    allocations that were still live at the last release, which the
    queries of "now" (``MemoryProfiler.live_attribution_marks``) need
    without reading the storage."""

    PENDING = 4096

    def __init__(self) -> None:
        self._chunks: list[np.ndarray] = []
        self._pending: list[tuple[int, int, int, int]] = []
        self._count = 0
        self._first = 0  # index of the first mark in _chunks / _pending
        self._array: np.ndarray | None = None
        self.kept: np.ndarray = np.zeros(0, MARK_DTYPE)

    def __len__(self) -> int:
        return self._count

    @property
    def first(self) -> int:
        """The index of the oldest mark held in order (the ones before it are stored)."""
        return self._first

    def release(self, before: int, keep_last: int) -> np.ndarray:
        """Drops the held marks with index < ``before``, except the last
        ``keep_last`` marks; whole chunks only (marks still waiting as tuples
        stay). Returns the marks dropped (the caller keeps the ones still
        bearing on a live allocation in ``kept``)."""
        limit = min(before, self._count - keep_last)
        dropped = []
        while self._chunks and self._first + len(self._chunks[0]) <= limit:
            chunk = self._chunks.pop(0)
            dropped.append(chunk)
            self._first += len(chunk)
        if not dropped:
            return np.zeros(0, MARK_DTYPE)
        self._array = None
        return dropped[0] if len(dropped) == 1 else np.concatenate(dropped)

    def append(self, seq: int, marks: Sequence[tuple[int, str, int]],
               validate: bool = True) -> None:
        """``(address, category, context_id)`` facts, all as of ``seq``.
        ``validate=False``: marks made by torchmem's own sources (addresses and
        context ids already ints in range, from C or from torch), whose per-mark
        checks cost more than the rest of the append."""
        if not marks:
            return
        index = MARK_INDEX
        if not validate:
            rows = [(seq, a, index.get(c, 0), x) for a, c, x in marks]
        else:
            try:  # what the array would refuse later, refused now
                rows = [(seq, _index(a), index.get(c, 0), _index(x)) for a, c, x in marks]
            except TypeError as exc:
                raise TypeError(f"a mark is (address int, category str, context id int): "
                                f"{exc}") from None
            for _, a, _, x in rows:
                if not (0 <= a < 2**64 and 0 <= x < 2**16):
                    raise ValueError(f"a mark needs an address in [0, 2**64) and a context "
                                     f"id in [0, 2**16): got {a}, {x}")
            unknown = [c for _, c, _ in marks if c not in index]
            if unknown:  # it would read as "none": a withdrawal
                raise ValueError(f"unknown mark category {unknown[0]!r}; one of "
                                 f"{', '.join(MARK_CATEGORIES)}")
        self._pending.extend(rows)
        self._count += len(marks)
        self._array = None
        if len(self._pending) >= self.PENDING:
            self._flush()

    def extend(self, marks: Sequence[tuple[int, int, str, int]]) -> None:
        """``(seq, address, category, context_id)`` marks (a saved trace's)."""
        if marks:
            self._flush()
            self._chunks.append(marks_array(marks))
            self._count += len(marks)
            self._array = None

    def _flush(self) -> None:
        if self._pending:
            self._chunks.append(np.array(self._pending, MARK_DTYPE))
            self._pending = []

    def array(self, start: int = 0) -> np.ndarray:
        """Marks from index ``start`` on, as a MARK_DTYPE array (held ones only:
        from ``first`` on, whatever ``start`` is)."""
        self._flush()
        start = max(start, self._first)
        if start > self._first:  # a sink's new marks: only the chunks that hold them
            parts, end = [], self._count
            for chunk in reversed(self._chunks):
                if end <= start:
                    break
                parts.append(chunk[max(0, start - (end - len(chunk))):])
                end -= len(chunk)
            return np.concatenate(parts[::-1]) if parts else np.zeros(0, MARK_DTYPE)
        if self._array is None:
            self._array = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros(0, MARK_DTYPE))
            self._chunks = [self._array] if len(self._array) else []
        return self._array

    def tuples(self, start: int = 0) -> list[tuple[int, int, str, int]]:
        """Marks from index ``start`` on as ``(seq, address, category, context_id)``."""
        return [(q, a, MARK_CATEGORIES[c], x) for q, a, c, x in self.array(start).tolist()]


def marks_array(marks: Sequence[tuple[int, int, str, int]]) -> np.ndarray:
    """Marks as a MARK_DTYPE array (an unknown category becomes "none")."""
    out = np.zeros(len(marks), MARK_DTYPE)
    if marks:
        seq, address, category, context = zip(*marks)
        out["seq"] = seq
        out["address"] = address
        out["category"] = [MARK_INDEX.get(c, 0) for c in category]
        out["context_id"] = context
    return out


class LiveContexts:
    """The process-wide native context table."""

    def __init__(self) -> None:
        self._known: list[tuple[str, str]] = []

    def table(self) -> list[tuple[str, str]]:
        """Every context so far, ``(module, phase)`` by id."""
        new = _recorder.contexts_since(len(self._known))
        if new:
            self._known.extend((m, PHASES[p]) for m, p in new)
        return self._known

    def resolve(self, context_id: int) -> tuple[str, str]:
        known = self._known if context_id < len(self._known) else self.table()
        return known[context_id] if context_id < len(known) else ("", "other")


class SavedContexts:
    """A context table read back from a trace (id 0 is ``("", "other")``); a trace
    still being written adds its new contexts with ``extend``."""

    def __init__(self, contexts: Sequence[tuple[str, str]] = (), start: int = 0) -> None:
        self._known: list[tuple[str, str]] = [("", "other")]
        self.extend(contexts, start)

    def extend(self, contexts: Sequence[tuple[str, str]], start: int) -> None:
        """Contexts from id ``start`` on (ids this table holds already are skipped)."""
        if not contexts:
            return
        if start > len(self._known):
            raise ValueError(f"context table starts at id {start}, "
                             f"after the {len(self._known)} held")
        for module, phase in list(contexts)[len(self._known) - start:]:
            if phase not in PHASE_INDEX:
                raise ValueError(f"unknown phase {phase!r} in the context table")
            self._known.append((str(module), str(phase)))

    def table(self) -> list[tuple[str, str]]:
        return self._known

    def resolve(self, context_id: int) -> tuple[str, str]:
        return self._known[context_id] if context_id < len(self._known) else ("", "other")
