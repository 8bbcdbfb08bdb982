"""The SQLite trace writer: a child process fed framed records through a pipe.

Python's sqlite3 binds every parameter with the GIL held, so an in-process
writer thread slows the training thread by ~10 us of GIL time per stored
event. Here the writer runs in its own interpreter, started as

    python -I -S .../torchmem/storage/_writer.py PATH OPTIONS_JSON

(run as a script, not ``-m torchmem...``: importing the package would import
torch and native code; ``-S`` also skips site-packages, so the child starts
in ~20 ms and TORCHMEM=1 autoenable cannot recurse into it). This file
therefore uses the standard library only; ``_sqlite_schema`` imports its
schema from here and checks it against EVENT_DTYPE.

Protocol (stdin, parent -> child): frames ``HEADER`` (kind byte, payload
length in bytes) + payload.
- ``E``: event rows, raw EVENT_DTYPE bytes (80 bytes each, seq consecutive).
- ``J``: side records as JSON (types, frames, stack nodes, GC records,
  snapshots, OOMs, anomalies, metadata); sent before the events that use them.
- ``F``: flush; payload is a token (uint64). Commit, then acknowledge.
- ``C``: close; commit, checkpoint the WAL into the file, close, acknowledge.
Replies (stdout, child -> parent): one JSON object per line:
``{"ready", "pid", "error"}`` once, ``{"ack": token, "written", "error"}``,
``{"error": msg, "written"}`` when a write fails (the writer then discards
everything but still answers flushes), ``{"closed": 1, "written", "error"}``.
Nothing is ever pickled.

Commits: at once when the pipe runs dry, and at most ``COMMIT_INTERVAL_S``
after a transaction began while data keeps streaming. EOF without a ``C``
frame means the parent died (SIGKILL included): the child commits what it
has and exits without checkpointing, leaving PATH-wal like any crash.

The same ``serve`` runs in a thread of the training process when the child
cannot be started (SQLiteStorage falls back to it with a warning).
"""

from __future__ import annotations

import json
import os
import select
import signal
import sqlite3
import struct
import sys
import time

FORMAT = "torchmem-trace"
SCHEMA_VERSION = 2

#: Event columns, in EVENT_DTYPE field order (the padding left out).
EVENT_COLUMNS = ("seq", "timestamp_ns", "address", "size", "stream", "step", "total_allocated",
                 "total_freed", "thread_id", "stack_id", "type_id", "device", "kind")
#: One EVENT_DTYPE row. Unsigned 64-bit fields unpack as signed ("q"): SQLite
#: integers are signed, so they are stored bit for bit (none is >= 2**63).
_ROW_FMT = "qqqqqqqqIIHhB3x"
EVENT_ROW = struct.Struct("<" + _ROW_FMT)
ROW_BYTES = EVENT_ROW.size  # 80
GC_COLUMNS = ("generation", "start_ns", "end_ns", "duration_ns", "collected", "uncollectable",
              "tensor_bytes_freed", "step")
OOM_COLUMNS = ("seq", "timestamp_ns", "requested_bytes", "device", "stream",
               "device_free_bytes", "device_total_bytes", "live_bytes", "stack_id")
#: Events per time_index row (at most; a row never spans two hand-overs).
TIME_CHUNK = 1024

SCHEMA = f"""
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
  seq INTEGER PRIMARY KEY, timestamp_ns INTEGER NOT NULL, address INTEGER NOT NULL,
  size INTEGER NOT NULL, stream INTEGER NOT NULL, step INTEGER NOT NULL,
  total_allocated INTEGER NOT NULL, total_freed INTEGER NOT NULL,
  thread_id INTEGER NOT NULL, stack_id INTEGER NOT NULL, type_id INTEGER NOT NULL,
  device INTEGER NOT NULL, kind INTEGER NOT NULL);
CREATE TABLE step_index (step INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,
  last_seq INTEGER NOT NULL);
CREATE TABLE time_index (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,
  min_timestamp_ns INTEGER NOT NULL, max_timestamp_ns INTEGER NOT NULL);
CREATE TABLE types (type_id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE frames (frame_id INTEGER PRIMARY KEY, filename TEXT NOT NULL,
  lineno INTEGER NOT NULL, function TEXT NOT NULL);
CREATE TABLE stack_nodes (node_id INTEGER PRIMARY KEY, parent INTEGER NOT NULL,
  frame_id INTEGER NOT NULL);
CREATE TABLE gc_records (gc_index INTEGER PRIMARY KEY,
  {", ".join(c + " INTEGER NOT NULL" for c in GC_COLUMNS)});
CREATE TABLE snapshots (snapshot_index INTEGER PRIMARY KEY, timestamp_ns INTEGER NOT NULL,
  step INTEGER NOT NULL, current_usage_bytes INTEGER NOT NULL,
  peak_usage_bytes INTEGER NOT NULL, usage_by_type TEXT NOT NULL,
  usage_by_device TEXT NOT NULL, devices TEXT);
CREATE TABLE ooms (oom_index INTEGER PRIMARY KEY,
  {", ".join(c + " INTEGER" for c in OOM_COLUMNS)}, extra TEXT);
CREATE TABLE anomalies (kind TEXT PRIMARY KEY, count INTEGER NOT NULL);
"""

HEADER = struct.Struct("<cQ")  # frame kind, payload bytes
EVENTS, SIDE, FLUSH, CLOSE = b"E", b"J", b"F", b"C"
TOKEN = struct.Struct("<Q")
COMMIT_INTERVAL_S = 0.1
#: Rows per multi-row INSERT: binding cost is per value, but each statement
#: step has a fixed cost; 32 rows (416 values) measured ~35% less CPU than 1.
_GROUP = 32
_GROUP_ROW = struct.Struct("<" + _ROW_FMT * _GROUP)
_PIECE_BYTES = 256 * ROW_BYTES * _GROUP  # read event frames ~650 KB at a time
_ALLOWED_PRAGMAS = ("max_page_count", "cache_size")  # tests simulate a full disk


def _insert_sql(rows: int) -> str:
    one = "(" + ", ".join("?" * len(EVENT_COLUMNS)) + ")"
    return (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) VALUES "
            + ", ".join([one] * rows))


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class TraceWriter:
    """Owns the write connection; turns frames into rows. Never raises from ``write_*``:
    the first error is kept in ``error`` (after a rollback) and later writes are no-ops.

    ``written`` counts committed events.
    """

    def __init__(self, path: str, options: dict) -> None:
        self.error: str | None = None
        self.written = 0
        self._pending = 0  # events in the open transaction
        self._n_types = 0
        self._steps: dict[int, list[int]] = {}  # step -> [first_seq, last_seq], uncommitted
        self._txn_start: float | None = None
        self._last_commit = time.monotonic()
        self.min_commit_gap_s = max(float(options.get("batch_interval_ms", 0)), 0.0) / 1000
        self.con = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self.con.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives the process dying (the WAL is already
            # written); only an OS crash or power loss may lose the last ones.
            self.con.execute("PRAGMA synchronous=NORMAL")
            self.con.executescript(SCHEMA)
            self.con.execute("INSERT INTO metadata VALUES ('format', ?), ('schema_version', ?)",
                             (json.dumps(FORMAT), json.dumps(SCHEMA_VERSION)))
            for name, value in (options.get("pragmas") or {}).items():
                if name in _ALLOWED_PRAGMAS:
                    self.con.execute(f"PRAGMA {name} = {int(value)}")
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)

    # -- transactions ------------------------------------------------------------
    def _begin(self) -> None:
        if self._txn_start is None:
            self.con.execute("BEGIN")
            self._txn_start = time.monotonic()

    def due(self, idle: bool) -> bool:
        """Whether to commit now: idle pipe (after the minimum gap) or an old transaction."""
        if self._txn_start is None:
            return False
        now = time.monotonic()
        if now - self._txn_start >= max(COMMIT_INTERVAL_S, self.min_commit_gap_s):
            return True
        return idle and now - self._last_commit >= self.min_commit_gap_s

    def commit(self) -> None:
        if self._txn_start is None or self.error is not None:
            return
        try:
            if self._steps:
                self.con.executemany(
                    "INSERT INTO step_index VALUES (?, ?, ?) ON CONFLICT(step) DO UPDATE SET "
                    "first_seq = min(first_seq, excluded.first_seq), "
                    "last_seq = max(last_seq, excluded.last_seq)",
                    [(s, a, b) for s, (a, b) in self._steps.items()])
                self._steps.clear()
            self.con.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)
            return
        self._txn_start = None
        self._last_commit = time.monotonic()
        self.written += self._pending
        self._pending = 0

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = one_line(exc)
        try:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._txn_start, self._pending = None, 0
        self._steps.clear()

    # -- frames ------------------------------------------------------------------
    def write_events(self, data: bytes) -> None:
        """Stores whole EVENT_DTYPE rows from ``data`` (a multiple of 80 bytes)."""
        if self.error is not None or not data:
            return
        try:
            self._begin()
            self._insert(data)
        except (sqlite3.Error, OSError, ValueError, OverflowError, struct.error) as exc:
            self._fail(exc)

    def _insert(self, data: bytes) -> None:
        n = len(data) // ROW_BYTES
        full = n - n % _GROUP
        groups = list(_GROUP_ROW.iter_unpack(data[:full * ROW_BYTES]))
        if groups:
            self.con.executemany(_insert_sql(_GROUP), groups)
        if n > full:
            rest = struct.unpack("<" + _ROW_FMT * (n - full), data[full * ROW_BYTES:])
            self.con.execute(_insert_sql(n - full), rest)
            groups.append(rest)
        self._pending += n
        # Side indexes instead of per-row B-trees: rows arrive in seq order, so
        # per chunk of TIME_CHUNK rows one time_index row (min/max time) and
        # per step its first/last seq answer range queries by rowid. Each
        # group is a flat tuple of 13 values per row: [1::13] are timestamps,
        # [5::13] steps, [0::13] seqs; min/max over slices run in C.
        per = TIME_CHUNK // _GROUP
        cols = len(EVENT_COLUMNS)
        time_rows = []
        for i in range(0, len(groups), per):
            part = groups[i:i + per]
            first, last = part[0][0], part[-1][-cols]
            ts = [g[1::cols] for g in part]
            time_rows.append((first, last, min(map(min, ts)), max(map(max, ts))))
            steps = [g[5::cols] for g in part]
            lo, hi = min(map(min, steps)), max(map(max, steps))
            if lo == hi:
                self._note_step(lo, first, last)
            else:  # a step boundary inside this chunk (rare): row by row
                for g in part:
                    for seq, step in zip(g[0::cols], g[5::cols]):
                        self._note_step(step, seq, seq)
        self.con.executemany("INSERT OR REPLACE INTO time_index VALUES (?, ?, ?, ?)", time_rows)

    def _note_step(self, step: int, first: int, last: int) -> None:
        r = self._steps.get(step)
        if r is None:
            self._steps[step] = [first, last]
        else:
            r[0], r[1] = min(r[0], first), max(r[1], last)

    def write_side(self, side: dict) -> None:
        """Stores side records (see SQLiteStorage._side_payload for the layout)."""
        if self.error is not None:
            return
        con = self.con
        try:
            self._begin()
            if side.get("meta"):
                con.executemany("INSERT OR REPLACE INTO metadata VALUES (?, ?)", side["meta"])
            names = side.get("types") or []
            if len(names) > self._n_types:
                con.executemany("INSERT OR REPLACE INTO types VALUES (?, ?)",
                                list(enumerate(names))[self._n_types:])
                self._n_types = len(names)
            for key, sql, width in (("frames", "frames", 3), ("nodes", "stack_nodes", 2),
                                    ("gc", "gc_records", len(GC_COLUMNS)),
                                    ("snapshots", "snapshots", 7),
                                    ("ooms", "ooms", len(OOM_COLUMNS) + 1)):
                if side.get(key):
                    start, rows = side[key]
                    con.executemany(
                        f"INSERT OR REPLACE INTO {sql} VALUES ({', '.join('?' * (width + 1))})",
                        [(start + i, *r) for i, r in enumerate(rows)])
            if side.get("anomalies"):
                con.executemany("INSERT OR REPLACE INTO anomalies VALUES (?, ?)",
                                list(side["anomalies"].items()))
        except (sqlite3.Error, OSError, ValueError, OverflowError, TypeError) as exc:
            self._fail(exc)

    def close(self, checkpoint: bool) -> None:
        """Commits; with ``checkpoint`` folds the WAL into the file (one self-contained file)."""
        self.commit()
        try:
            if checkpoint and self.error is None:
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self.con.close()
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)


class _Input:
    """Exact-size reads from a pipe, and whether more bytes wait (to commit when idle)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0

    def read(self, n: int) -> bytes | None:
        """Exactly ``n`` bytes, or None at EOF."""
        while len(self.buf) - self.pos < n:
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            chunk = os.read(self.fd, max(n - len(self.buf), 1 << 20))
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def waiting(self) -> bool:
        if len(self.buf) > self.pos:
            return True
        return bool(select.select([self.fd], [], [], 0)[0])


def _reply(fd: int, obj: dict) -> None:
    data = (json.dumps(obj) + "\n").encode()
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:  # the parent is gone; the data still gets stored
        pass


def serve(in_fd: int, out_fd: int, path: str, options: dict) -> TraceWriter | None:
    """Writes frames from ``in_fd`` into ``path`` until CLOSE (returns None) or EOF.

    On EOF the last transaction is committed and the writer is returned with
    its connection open: the child then exits without checkpointing, a
    thread closes it.
    """
    w = TraceWriter(path, options)
    _reply(out_fd, {"ready": 1, "pid": os.getpid(), "error": w.error})
    inp = _Input(in_fd)
    reported = w.error is not None

    def check() -> None:
        nonlocal reported
        if w.error is not None and not reported:
            reported = True
            _reply(out_fd, {"error": w.error, "written": w.written})

    while True:
        if w.due(idle=not inp.waiting()):
            w.commit()
        check()
        head = inp.read(HEADER.size)
        if head is None:
            break
        kind, n = HEADER.unpack(head)
        if kind == EVENTS:
            while n > 0:
                data = inp.read(min(n, _PIECE_BYTES))
                if data is None:
                    break
                n -= len(data)
                w.write_events(data)
                if w.due(idle=False):
                    w.commit()
            check()
        elif kind in (SIDE, FLUSH):
            data = inp.read(n)
            if data is None:
                break
            if kind == SIDE:
                try:
                    side = json.loads(data)
                except ValueError as exc:
                    w._fail(exc)
                else:
                    w.write_side(side)
            else:
                w.commit()
                check()
                _reply(out_fd, {"ack": TOKEN.unpack(data)[0], "written": w.written,
                                "error": w.error})
        elif kind == CLOSE:
            w.close(checkpoint=True)
            check()
            _reply(out_fd, {"closed": 1, "written": w.written, "error": w.error})
            return None
        else:  # cannot resynchronise a byte stream: stop storing, keep answering EOF
            w._fail(ValueError(f"bad frame kind {kind!r} from the profiler"))
            check()
            while inp.read(1 << 16) is not None:
                pass
            break
    w.commit()
    check()
    return w


def main(argv: list[str]) -> int:
    # The child lives exactly as long as its stdin: Ctrl-C, SIGTERM or SIGHUP
    # sent to the whole process group must not cut the drain after the
    # parent dies. A file-size limit must be a write error, not a kill.
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    path = argv[1]
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    if serve(0, 1, path, options) is None:
        return 0
    # EOF without CLOSE: the profiler died. Everything it sent is committed;
    # exit without closing the connection, which would checkpoint while a
    # reader may already be opening the file. The WAL stays, as after a crash.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
