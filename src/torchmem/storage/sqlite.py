"""SQLiteStorage: a durable, crash-safe trace written by a background thread.

Each ``append`` (the profiler's pump calls it every flush interval, 200 ms
by default) is queued; a writer thread stores everything queued in one
transaction and commits. WAL mode makes every commit survive a crash of the
process (SIGKILL included): a reader then sees every event up to the last
commit. Write errors (disk full, I/O errors, a deleted directory) produce
one warning; the profiler goes on in memory and nothing raises into the
training run. The schema is in ``_sqlite_schema.py`` and docs/trace-format.md.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import sys
import threading
import time
import warnings
from typing import Any

import numpy as np

from ..trace import TraceDelta
from . import _sqlite_schema as schema
from .base import TraceFormatError

__all__ = ["SQLiteStorage", "TraceReader"]

_ROW = struct.Struct(schema.EVENT_ROW_FORMAT)


class _Batch:
    """What one append adds, converted on the caller's thread to plain data."""

    __slots__ = ("events", "n_events", "type_names", "frames", "frames_start", "nodes",
                 "nodes_start", "gc", "gc_start", "snapshots", "snapshots_start", "ooms",
                 "ooms_start", "anomalies")

    def __init__(self, d: TraceDelta) -> None:
        self.n_events = len(d.events)
        # One vectorised copy; the writer thread unpacks it with struct, which
        # costs far less time holding the GIL than a Python object per field.
        self.events = schema.events_to_int64(d.events) if self.n_events else b""
        self.type_names = list(d.type_names)
        self.frames, self.frames_start = list(d.frames), d.frames_start
        self.nodes = [(int(p), int(f)) for p, f in d.stack_nodes.tolist()]
        self.nodes_start = d.nodes_start
        self.gc, self.gc_start = list(d.gc_records), d.gc_start
        self.snapshots, self.snapshots_start = list(d.snapshots), d.snapshots_start
        self.ooms, self.ooms_start = [dict(o) for o in d.ooms], d.ooms_start
        self.anomalies = dict(d.anomalies)


def _connect(path: str, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
            return con
        except sqlite3.OperationalError:
            # A trace left by a killed writer still has its -wal file, and
            # recovering it needs write access to the -shm file.
            pass
    return sqlite3.connect(path, check_same_thread=False, isolation_level=None)


class TraceReader:
    """Read access to a saved trace; every problem is a one-line TraceFormatError."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        schema.check_file(self.path)
        try:
            self._con = _connect(self.path, read_only=True)
        except sqlite3.DatabaseError as exc:
            raise TraceFormatError(f"{self.path}: cannot open trace ({schema.one_line(exc)})") \
                from None
        try:
            self._meta = schema.read_metadata(self._con, self.path)
        except BaseException:
            self._con.close()
            raise

    @property
    def metadata(self) -> dict[str, Any]:
        """Run metadata (torch version, devices, start time, settings, ...)."""
        return dict(self._meta)

    def _guard(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(self._con, *args, **kwargs)
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError) as exc:
            raise TraceFormatError(f"{self.path}: corrupt trace ({schema.one_line(exc)})") \
                from None

    def read_events(self, *, before_seq: int | None = None, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Stored events matching the filters (steps inclusive, time in epoch ns), by seq."""
        return self._guard(schema.query_events, before_seq=before_seq, start_step=start_step,
                           end_step=end_step, since_ns=since_ns)

    def read_trace(self) -> TraceDelta:
        """The whole trace as one TraceDelta."""
        return self._guard(schema.read_delta)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SQLiteStorage:
    """Stores a profiler's trace in an SQLite file at ``path``.

    Args:
        path: the trace file; created with mode 0600.
        overwrite: replace an existing file (else FileExistsError).
        batch_interval_ms: the writer waits at least this long between two
            commits (0 = commit whatever is queued at once). The pump already
            appends every 200 ms, so the default adds no delay.

    ``write_error`` holds the reason storing stopped (None while healthy);
    ``events_written`` counts committed events.
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False,
                 batch_interval_ms: float = 0.0) -> None:
        self.path = os.fspath(path)
        schema.create_private_file(self.path, overwrite)
        self._con = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._con.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit survives the process dying (WAL is already on
        # disk); only an OS crash or power loss may lose the last commits.
        self._con.execute("PRAGMA synchronous=NORMAL")
        self._con.executescript(schema.SCHEMA)
        self._con.execute("INSERT INTO metadata VALUES ('format', ?), ('schema_version', ?)",
                          (schema.to_json(schema.FORMAT), schema.to_json(schema.SCHEMA_VERSION)))
        self._metadata: dict[str, Any] = {}
        self._batch_interval_s = max(float(batch_interval_ms), 0.0) / 1000.0
        self._cond = threading.Condition()
        self._queue: list[_Batch] = []
        self._queued = 0  # appends accepted
        self._done = 0  # appends committed (or dropped after an error)
        self._n_types = 0
        self._closing = False
        self.closed = False
        self.write_error: str | None = None
        self.events_written = 0
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        self._thread = threading.Thread(target=self._run, name="torchmem-sqlite", daemon=True)
        self._thread.start()

    # -- the StorageBackend protocol -------------------------------------------
    def open(self, metadata: dict[str, Any] | None = None) -> None:
        """Records run metadata; each key becomes one JSON row of ``metadata``."""
        meta = {k: v for k, v in (metadata or {}).items()
                if k not in ("format", "schema_version")}
        self._metadata.update(meta)
        rows = [(k, schema.to_json(v)) for k, v in meta.items()]
        self._submit(("meta", rows))

    @property
    def metadata(self) -> dict[str, Any]:
        """The run metadata given to ``open``."""
        return dict(self._metadata)

    def append(self, delta: TraceDelta) -> None:
        """Queues ``delta`` for the writer thread; never blocks on the disk."""
        if self.closed or self.write_error is not None:
            return
        self._submit(_Batch(delta))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Blocks until everything appended so far is committed; False on timeout."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._done >= target or not self._thread.is_alive(),
                                       timeout)

    def read_events(self, *, before_seq: int | None = None, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Committed events matching the filters, by seq (after a flush)."""
        self.flush()
        with self._read_lock:
            return schema.query_events(self._reader_con(), before_seq=before_seq,
                                       start_step=start_step, end_step=end_step,
                                       since_ns=since_ns)

    def read_trace(self) -> TraceDelta:
        """Everything committed, as one TraceDelta (after a flush)."""
        self.flush()
        with self._read_lock:
            return schema.read_delta(self._reader_con())

    def close(self) -> None:
        """Commits what is queued, checkpoints the WAL into the file and closes it."""
        if self.closed:
            return
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(timeout=60)
        self.closed = True
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        try:
            if self.write_error is None:
                # Leaves one self-contained file (no -wal) after a clean exit.
                self._con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._con.close()
        except sqlite3.Error as exc:
            self._fail(exc)

    # -- internals ---------------------------------------------------------------
    def _reader_con(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = sqlite3.connect(self.path, check_same_thread=False)
        return self._reader

    def _submit(self, item: Any) -> None:
        with self._cond:
            self._queue.append(item)
            self._queued += 1
            self._cond.notify_all()

    def _run(self) -> None:
        last = 0.0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closing)
                if not self._queue and self._closing:
                    return
            wait = last + self._batch_interval_s - time.monotonic()
            if wait > 0 and not self._closing:
                time.sleep(wait)
            with self._cond:
                items, self._queue = self._queue, []
            if self.write_error is None:
                try:
                    self._write(items)
                except (sqlite3.Error, OSError, ValueError, OverflowError) as exc:
                    self._fail(exc)
            last = time.monotonic()
            with self._cond:
                self._done += len(items)
                self._cond.notify_all()

    def _fail(self, exc: BaseException) -> None:
        if self.write_error is not None:
            return
        self.write_error = schema.one_line(exc)
        try:
            if self._con.in_transaction:
                self._con.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        message = (f"torchmem: writing the trace {self.path} failed ({self.write_error}); "
                   f"it holds the events up to the last commit, profiling goes on in memory")
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        except Exception:  # warnings turned into errors must not kill the writer
            print(message, file=sys.stderr)

    def _write(self, items: list[Any]) -> None:
        con = self._con
        con.execute("BEGIN")
        n_events = 0
        for item in items:
            if isinstance(item, tuple):  # ("meta", rows)
                con.executemany("INSERT OR REPLACE INTO metadata VALUES (?, ?)", item[1])
                continue
            n_events += self._write_batch(con, item)
        con.execute("COMMIT")
        self.events_written += n_events

    def _write_batch(self, con: sqlite3.Connection, b: _Batch) -> int:
        if b.n_events:
            con.executemany(schema.INSERT_EVENTS, _ROW.iter_unpack(b.events))
        if len(b.type_names) > self._n_types:
            con.executemany("INSERT OR REPLACE INTO types VALUES (?, ?)",
                            list(enumerate(b.type_names))[self._n_types:])
            self._n_types = len(b.type_names)
        if b.frames:
            con.executemany("INSERT OR REPLACE INTO frames VALUES (?, ?, ?, ?)",
                            [(b.frames_start + i, str(f), int(line), str(fn))
                             for i, (f, line, fn) in enumerate(b.frames)])
        if b.nodes:
            con.executemany("INSERT OR REPLACE INTO stack_nodes VALUES (?, ?, ?)",
                            [(b.nodes_start + i, p, f) for i, (p, f) in enumerate(b.nodes)])
        if b.gc:
            con.executemany(
                f"INSERT OR REPLACE INTO gc_records VALUES ({', '.join('?' * (len(schema.GC_COLUMNS) + 1))})",
                [(b.gc_start + i, *(getattr(r, c) for c in schema.GC_COLUMNS))
                 for i, r in enumerate(b.gc)])
        if b.snapshots:
            con.executemany("INSERT OR REPLACE INTO snapshots VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            [schema.snapshot_row(b.snapshots_start + i, s)
                             for i, s in enumerate(b.snapshots)])
        if b.ooms:
            n = len(schema.OOM_COLUMNS) + 2
            con.executemany(f"INSERT OR REPLACE INTO ooms VALUES ({', '.join('?' * n)})",
                            [schema.oom_row(b.ooms_start + i, o) for i, o in enumerate(b.ooms)])
        if b.anomalies:
            con.executemany("INSERT OR REPLACE INTO anomalies VALUES (?, ?)",
                            list(b.anomalies.items()))
        return b.n_events
