"""Side records of one kind (GC records, snapshots) as a profiler holds them.

Records are numbered from 0 in the order they were made: a marker event's
address column holds its record's number. With a storage that reads side
records back (``read_side_records``), the oldest ones leave memory once it has
them (``MemoryProfiler.release_stored``); they are read back from it when asked,
a block at a time. Without one, every record stays (``first`` stays 0).

Not thread-safe by itself: the profiler calls it under its own lock, except
``read_older`` and ``stored``, which read the storage and must not hold it (GC
callbacks and the snapshot timer take it).
"""

from __future__ import annotations

from typing import Any

__all__ = ["HeldRecords"]


class HeldRecords:
    """``items``: the records from number ``first`` on, oldest first."""

    __slots__ = ("kind", "items", "first", "_blocks")

    #: Records read back per storage query for marker details (a batch of
    #: events names consecutive ones), and how many such blocks are cached.
    BLOCK = 256
    CACHED_BLOCKS = 2

    def __init__(self, kind: str) -> None:
        self.kind = kind  # the storage's name for them: "gc", "snapshots"
        self.items: list[Any] = []
        self.first = 0
        self._blocks: dict[int, list[Any]] = {}  # block start -> records read back

    @property
    def next_index(self) -> int:
        """The number the next record gets (how many were ever made)."""
        return self.first + len(self.items)

    def append(self, record: Any) -> int:
        """Holds ``record``; returns its number."""
        self.items.append(record)
        return self.first + len(self.items) - 1

    def since(self, index: int) -> list[Any]:
        """The held records numbered ``index`` on (a sink's cursor)."""
        return self.items[max(0, index - self.first):]

    def release(self, stored: int, keep: int) -> None:
        """The records before number ``stored`` are in the storage: they leave
        memory, except the latest ``keep`` records."""
        n = min(stored - self.first, len(self.items) - keep)
        if n > 0:
            del self.items[:n]
            self.first += n

    def __getitem__(self, index: int) -> Any:
        # For marker_details, which indexes by record number: a record that
        # left memory is an IndexError, as one past the end is.
        if index < self.first:
            raise IndexError(index)
        return self.items[index - self.first]

    def read_older(self, storage: Any, first: int) -> list[Any]:
        """The records before number ``first`` (``first`` as read with the held
        ones), from the storage; records it cannot give are left out."""
        if not first:
            return []
        return [r for r in storage.read_side_records(self.kind, 0, first) if r is not None]

    def stored(self, storage: Any, index: int) -> Any:
        """Record ``index``, which left memory, from the storage (a block at a
        time, the last few blocks cached); None when it has no such record."""
        block = index - index % self.BLOCK
        records = self._blocks.get(block)
        if records is None:
            records = storage.read_side_records(self.kind, block, block + self.BLOCK)
            if len(self._blocks) >= self.CACHED_BLOCKS:
                self._blocks.pop(next(iter(self._blocks)))
            self._blocks[block] = records
        i = index - block
        return records[i] if i < len(records) else None
