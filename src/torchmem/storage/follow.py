"""Following a SQLite trace while it is written: what was committed since the last look.

The writer child commits at least every 100 ms in WAL mode, so a reader in
another process sees each commit whole. ``TraceFollower.poll()`` opens one
read transaction, takes the events from the next seq on (rows and chunks
alike, the way every reader does) and the side records from their next
indices, and hands them over as a ``TraceDelta`` whose starts continue the
previous one: ``MemoryProfiler.from_trace`` then ``extend_from_trace``
replay them. No transaction stays open between polls, so the follower never
holds the writer's WAL back from being checkpointed.
"""

from __future__ import annotations

import os
import sqlite3
from typing import Any

from ..trace import TraceDelta
from . import _event_reads, _sqlite_schema as schema
from .base import TraceFormatError

__all__ = ["TraceFollower"]


class TraceFollower:
    """Reads the trace at ``path`` a part at a time, while it is being written.

    Args:
        path: the SQLite trace (it may not exist yet).
        max_events: the most events one ``poll`` returns (a long trace is
            caught up over several polls, each of bounded memory).
    """

    def __init__(self, path: str | os.PathLike, *, max_events: int = 500_000) -> None:
        self.path = os.fspath(path)
        self.max_events = int(max_events)
        self.metadata: dict[str, Any] = {}
        self._cursors = {"seq": 0, "frames": 0, "nodes": 0, "contexts": 0, "marks": 0, "gc": 0,
                         "snapshots": 0, "ooms": 0}
        self._con: sqlite3.Connection | None = None
        #: Whether the last poll returned every event committed so far.
        self.caught_up = False

    @property
    def events_read(self) -> int:
        """Events handed out so far."""
        return self._cursors["seq"]

    @property
    def finished(self) -> bool:
        """The writer has closed the trace (metadata ``expanded`` is 1)."""
        return self.metadata.get("expanded") == 1

    def poll(self) -> TraceDelta | None:
        """What was committed since the last poll, or None while there is no trace yet
        (the file is missing, empty or its schema not written). Raises
        TraceFormatError for a file that is not a torchmem trace, or corrupt."""
        con = self._connect()
        if con is None:
            return None
        try:
            with _event_reads._snapshot(con):
                if con.execute("SELECT 1 FROM metadata WHERE key = 'format'").fetchone() is None:
                    return None  # the writer made the tables and fills in the format next
                self.metadata = schema.read_metadata(con, self.path)
                delta = schema.read_delta(con, self._cursors, self.max_events)
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None  # the writer is creating the schema
            raise TraceFormatError(f"{self.path}: cannot read trace "
                                   f"({schema.one_line(exc)})") from None
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise TraceFormatError(f"{self.path}: corrupt trace ({schema.one_line(exc)})") \
                from None
        events = delta.events
        if len(events) and int(events["seq"][0]) != self._cursors["seq"]:
            raise TraceFormatError(f"{self.path}: events from seq {int(events['seq'][0])} "
                                   f"follow seq {self._cursors['seq'] - 1}")
        self.caught_up = len(events) < self.max_events
        self._cursors.update(
            seq=self._cursors["seq"] + len(events),
            frames=delta.frames_start + len(delta.frames),
            nodes=delta.nodes_start + len(delta.stack_nodes),
            contexts=delta.contexts_start + len(delta.contexts),
            marks=delta.marks_start + len(delta.marks),
            gc=delta.gc_start + len(delta.gc_records),
            snapshots=delta.snapshots_start + len(delta.snapshots),
            ooms=delta.ooms_start + len(delta.ooms))
        return delta

    def _connect(self) -> sqlite3.Connection | None:
        if self._con is not None:
            return self._con
        try:
            if os.path.getsize(self.path) == 0:
                return None  # created, the writer has not opened it yet
        except FileNotFoundError:
            return None
        schema.check_file(self.path)
        try:
            con = schema.connect(self.path)
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master "
                                                "WHERE type='table'")}
        except sqlite3.DatabaseError as exc:
            raise TraceFormatError(f"{self.path}: cannot open trace "
                                   f"({schema.one_line(exc)})") from None
        if "metadata" not in tables:
            con.close()
            return None
        self._con = con
        return con

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None

    def __enter__(self) -> "TraceFollower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
