"""The SQLite trace writer: a child process fed framed records through a pipe.

Over 400 lines on purpose: the child process runs this file as a script with
the standard library only and finds nothing but its sibling ``_chunks.py``
by path; every further module would be one more file it loads by path.

Python's sqlite3 binds every parameter with the GIL held, so an in-process
writer thread slows the training thread by ~10 us of GIL time per stored
event. Here the writer runs in its own interpreter, started as

    python -I -S .../torchmem/storage/_writer.py PATH OPTIONS_JSON

(run as a script, not ``-m torchmem...``: importing the package would import
torch and native code; ``-S`` also skips site-packages, so the child starts
in ~20 ms and TORCHMEM=1 autoenable cannot recurse into it). This file
and its sibling ``_chunks.py`` (found through the script's folder)
therefore use the standard library only; ``_sqlite_schema`` imports the
schema from here and checks it against EVENT_DTYPE.

Protocol (stdin, parent -> child): frames ``HEADER`` (kind byte, payload
length in bytes) + payload.
- ``E``: event rows, raw EVENT_DTYPE bytes (80 bytes each, seq consecutive),
  stored as they come in ``event_chunks`` (one ``ROWS`` BLOB per piece of
  <= 8K rows) and expanded into ``events`` rows at the end.
- ``K``: one ``COLUMNS`` chunk (``_chunks.py``) as the recorder sends it,
  stored as it comes; expanded like ``E`` rows. By default nothing is
  expanded while the run lasts (``expand_idle``: while the pipe is idle):
  expansion costs ~2-3 us of CPU per event, which a training job that keeps
  every core busy pays in step time (issue 12).
- ``J``: side records as JSON (types, frames, stack nodes, contexts, marks,
  GC records, snapshots, OOMs, anomalies, metadata); sent before the events
  that use them.
- ``F``: flush; payload is a token (uint64). Commit, then acknowledge.
- ``C``: close; commit, acknowledge (with the backlog of unexpanded events),
  expand the rest, set metadata ``expanded``, checkpoint the WAL, exit.
The frame kinds and header come from ``_trace_format`` (through ``_chunks``),
as the recorder writing ``K`` frames has them. A frame of another kind, or
longer than its kind allows, cannot be resynchronised: the writer reports it, stores nothing more, reads to EOF.
Replies (stdout, child -> parent): one JSON object per line:
``{"ready", "pid", "error"}`` once, ``{"ack": token, "written", "error"}``,
``{"error": msg, "written"}`` when a write fails (the writer then discards
everything but still answers flushes), ``{"closed": 1, "written", "error",
"backlog"}``.
Nothing is ever pickled.

Commits: at once when the pipe runs dry, and at most ``COMMIT_INTERVAL_S``
after a transaction began while data keeps streaming. EOF without a ``C``
frame means the parent died (SIGKILL included): the child commits what it
has, expands it, and exits without checkpointing, leaving PATH-wal like any
crash.

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
from urllib.parse import quote, urlencode

if __package__:
    from . import _chunks
else:  # run as a script (python -I -S): the package is not importable, its folder is
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import _chunks

EVENT_COLUMNS, ROW_BYTES = _chunks.EVENT_COLUMNS, _chunks.ROW_BYTES

FORMAT = "torchmem-trace"
SCHEMA_VERSION = 5
GC_COLUMNS = ("generation", "start_ns", "end_ns", "duration_ns", "collected", "uncollectable",
              "tensor_bytes_freed", "step")
OOM_COLUMNS = ("seq", "timestamp_ns", "requested_bytes", "device", "stream",
               "device_free_bytes", "device_total_bytes", "live_bytes", "stack_id")

SCHEMA = f"""
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
  seq INTEGER PRIMARY KEY, timestamp_ns INTEGER NOT NULL, address INTEGER NOT NULL,
  size INTEGER NOT NULL, stream INTEGER NOT NULL, step INTEGER NOT NULL,
  total_allocated INTEGER NOT NULL, total_freed INTEGER NOT NULL,
  thread_id INTEGER NOT NULL, stack_id INTEGER NOT NULL, type_id INTEGER NOT NULL,
  device INTEGER NOT NULL, kind INTEGER NOT NULL, context_id INTEGER NOT NULL DEFAULT 0);
CREATE TABLE event_chunks (first_seq INTEGER PRIMARY KEY, n INTEGER NOT NULL,
  rows BLOB NOT NULL, layout INTEGER NOT NULL DEFAULT 0);
CREATE TABLE event_columns (first_seq INTEGER PRIMARY KEY, n INTEGER NOT NULL,
  rows BLOB NOT NULL, layout INTEGER NOT NULL DEFAULT 0);
CREATE TABLE step_index (step INTEGER PRIMARY KEY, first_seq INTEGER NOT NULL,
  last_seq INTEGER NOT NULL);
CREATE TABLE time_index (first_seq INTEGER PRIMARY KEY, last_seq INTEGER NOT NULL,
  min_timestamp_ns INTEGER NOT NULL, max_timestamp_ns INTEGER NOT NULL);
CREATE TABLE types (type_id INTEGER PRIMARY KEY, name TEXT NOT NULL);
CREATE TABLE frames (frame_id INTEGER PRIMARY KEY, filename TEXT NOT NULL,
  lineno INTEGER NOT NULL, function TEXT NOT NULL);
CREATE TABLE stack_nodes (node_id INTEGER PRIMARY KEY, parent INTEGER NOT NULL,
  frame_id INTEGER NOT NULL);
CREATE TABLE contexts (context_id INTEGER PRIMARY KEY, module TEXT NOT NULL,
  phase TEXT NOT NULL);
CREATE TABLE marks (mark_index INTEGER PRIMARY KEY, seq INTEGER NOT NULL,
  address INTEGER NOT NULL, category TEXT NOT NULL, context_id INTEGER NOT NULL);
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

#: ``event_columns`` keeps each expanded chunk as a copy of its rows, which
#: readers decode with numpy at ~50x the speed of fetching rows through
#: sqlite3 (issue 12). These triggers, made when the writer finishes, drop
#: the copy of any chunk whose rows change afterwards, whoever changes them:
#: the rows stay the truth, and readers use the copies only while all three
#: triggers exist (COPY_TRIGGERS).
_COVERING = ("DELETE FROM event_columns WHERE first_seq = (SELECT MAX(first_seq) FROM "
             "event_columns WHERE first_seq <= {0}.seq) AND first_seq + n > {0}.seq;")
COPY_TRIGGERS = {
    "event_columns_on_insert": ("INSERT", _COVERING.format("NEW")),
    "event_columns_on_update": ("UPDATE", _COVERING.format("OLD") + " " + _COVERING.format("NEW")),
    "event_columns_on_delete": ("DELETE", _COVERING.format("OLD")),
}
TRIGGERS_SQL = "".join(f"CREATE TRIGGER IF NOT EXISTS {name} AFTER {when} ON events "
                       f"BEGIN {body} END;\n"
                       for name, (when, body) in COPY_TRIGGERS.items())

HEADER = struct.Struct(_chunks.FORMAT["frame_header"])  # frame kind, payload bytes
EVENTS, COLUMNS, SIDE, FLUSH, CLOSE = (_chunks.FORMAT["frame_kinds"][k].encode()
                                       for k in ("events", "columns", "side", "flush", "close"))
#: A SIDE frame past this is corrupt: a hand-over's side records are kilobytes.
MAX_SIDE_BYTES = 1 << 30
#: The largest COLUMNS payload: a whole event-log chunk with every column full (~400 KB).
MAX_COLUMNS_BYTES = _chunks.COLUMNS_HEAD.size + _chunks.CHUNK_EVENTS * sum(
    struct.calcsize(code) for _, code in _chunks.CHUNK_COLUMNS)
TOKEN = struct.Struct("<Q")
COMMIT_INTERVAL_S = 0.1
#: 64 KiB pages commit chunk BLOBs ~8x faster than 4 KiB ones (~0.1 us vs
#: ~0.9 us per event, measured; 8 KiB was no faster); the price is an empty
#: trace of ~1 MB (one page per table and index).
PAGE_SIZE = 65536
#: WAL size (bytes) at which SQLite checkpoints on its own during a stream.
WAL_CHECKPOINT_BYTES = 1 << 30
# SQLite's own checkpoints cannot restart the WAL while a reader's snapshot
# uses it, so with readers attached it grows past WAL_CHECKPOINT_BYTES (3.9 GB
# seen). Past WAL_LIMIT_BYTES the writer truncates it itself after each
# commit, waiting up to WAL_WAIT_MS for readers each time (and saying so once);
# meanwhile events wait in the pipe, then in the recorder, up to its bound.
WAL_LIMIT_BYTES = 2 * WAL_CHECKPOINT_BYTES
WAL_WAIT_MS = 1000
#: With ``expand_idle`` (off by default): seconds without a frame before the
#: writer expands chunks into rows while the run lasts, and the share of the
#: time it then spends expanding (~2-3 us of CPU per event).
EXPAND_QUIET_S = 0.05
EXPAND_DUTY = 0.25
#: After the run, a child with more than this many events to expand does it
#: at nice EXPAND_NICE: the parent does not wait for it (SQLiteStorage's
#: CLOSE_WAIT_BACKLOG), and whatever runs next on the machine comes first.
BACKGROUND_BACKLOG = 50_000
EXPAND_NICE = 5
#: Rows per multi-row INSERT: binding cost is per value, but each statement
#: step has a fixed cost; 32 rows (416 values) measured ~35% less CPU than 1.
_GROUP = 32
_PIECE_BYTES = _chunks.CHUNK_EVENTS * ROW_BYTES  # read E frames ~650 KB at a time
_ALLOWED_PRAGMAS = ("max_page_count", "cache_size")  # tests simulate a full disk


#: The longest full path SQLite's unix VFS opens (its MAX_PATHNAME, 512,
#: less room for a suffix; measured with SQLite 3.40): longer ones fail with
#: "unable to open database file", so they are refused with that said.
MAX_PATH_BYTES = 504


def check_path_length(path: str) -> None:
    """Raises ValueError when SQLite cannot open ``path`` for its length (symlinks
    resolved, as SQLite resolves them)."""
    n = len(os.fsencode(os.path.realpath(path)))
    if n > MAX_PATH_BYTES:
        raise ValueError(f"{path}: the path is {n} bytes long; SQLite opens paths of at most "
                         f"{MAX_PATH_BYTES} bytes (symlinks resolved): move the trace higher up")


def sqlite_uri(path: str, **params: str) -> str:
    """A ``file:`` URI that names exactly ``path`` for ``sqlite3.connect(uri=True)``.

    Every byte but ``/`` is percent-encoded, so ``#``, ``?``, ``%XX``, spaces,
    newlines and non-ASCII names mean themselves; a name that starts with
    ``file:`` or a dash is just a name. Relative paths are made absolute.
    """
    uri = "file://" + quote(os.fsencode(os.path.abspath(path)), safe="/")
    return uri + ("?" + urlencode(params) if params else "")


def _file_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


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
        self.backlog = 0  # committed events still in event_chunks
        self._new_backlog = 0  # events chunked in the open transaction
        self._expanded = 0  # events moved into rows in the open transaction
        self._n_types = 0
        self._steps: dict[int, list[int]] = {}  # step -> [first_seq, last_seq], uncommitted
        self._txn_start: float | None = None
        self._last_commit = time.monotonic()
        self.min_commit_gap_s = max(float(options.get("batch_interval_ms", 0)), 0.0) / 1000
        self.wal_limit_bytes = int(options.get("wal_limit_bytes") or WAL_LIMIT_BYTES)
        self.warning: str | None = None  # said once to the profiler (serve)
        try:
            check_path_length(path)
            self.con = sqlite3.connect(sqlite_uri(path, mode="rw"), uri=True,
                                       isolation_level=None, check_same_thread=False)
        except (sqlite3.Error, OSError, ValueError) as exc:
            self.con = sqlite3.connect(":memory:", isolation_level=None, check_same_thread=False)
            self._fail(exc)
            return
        self.path, self._file_id = path, _file_id(path)
        try:
            # An event chunk (<= 650 KB) is a BLOB spread over overflow
            # pages; their WAL frames dominate the writer's cost (PAGE_SIZE).
            self.con.execute(f"PRAGMA page_size={PAGE_SIZE}")
            self.con.execute("PRAGMA journal_mode=WAL")
            # NORMAL: a commit survives the process dying (the WAL is already
            # written); only an OS crash or power loss may lose the last ones.
            self.con.execute("PRAGMA synchronous=NORMAL")
            # A checkpoint copies the WAL into the database and fsyncs it:
            # at SQLite's default (every 1000 pages, 64 MiB here) that caps
            # the writer at ~190 MB/s of events on the development machine,
            # against ~800 MB/s without. So SQLite checkpoints only once the
            # WAL passes WAL_CHECKPOINT_BYTES, and close() checkpoints the
            # rest at the end of the run.
            self.con.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_BYTES // PAGE_SIZE}")
            self.con.executescript(SCHEMA)
            self.con.execute("INSERT INTO metadata VALUES ('format', ?), ('schema_version', ?), "
                             "('expanded', '0')", (json.dumps(FORMAT), json.dumps(SCHEMA_VERSION)))
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
        if _file_id(self.path) != self._file_id:  # one stat per commit: ~1 us
            # SQLite would go on writing into a file no one can open again.
            self._fail(RuntimeError("the trace file was deleted or replaced by another "
                                    "process while being written"))
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
        self._bound_wal()
        self._last_commit = time.monotonic()
        self.written += self._pending
        self.backlog += self._new_backlog - self._expanded
        self._pending = self._new_backlog = self._expanded = 0

    def _bound_wal(self) -> None:
        try:
            size = os.stat(self.path + "-wal").st_size
        except OSError:
            return
        if size <= self.wal_limit_bytes:
            return
        try:
            self.con.execute(f"PRAGMA busy_timeout={WAL_WAIT_MS}")
            busy = self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
            self.con.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error:
            busy = 1
        if busy and self.warning is None:
            self.warning = (f"its WAL ({self.path}-wal) has grown to {size / 2**20:,.0f} MiB, "
                            f"past {self.wal_limit_bytes / 2**20:,.0f} MiB, because a reader "
                            f"of the trace keeps SQLite from resetting it; the writer waits "
                            f"for readers to finish, and events wait in memory meanwhile")

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = one_line(exc)
        try:
            if self.con.in_transaction:
                self.con.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self._txn_start, self._pending = None, 0
        self._new_backlog = self._expanded = 0
        self._steps.clear()

    # -- frames ------------------------------------------------------------------
    def write_events(self, data: bytes | bytearray, layout: int = _chunks.ROWS) -> None:
        """Stores one chunk of events as it came (``_chunks``: whole EVENT_DTYPE rows,
        or one COLUMNS chunk).

        One INSERT of the raw bytes per piece (up to 8K events): SQLite's
        per-value binding (~2 us per 13-column row) would saturate a core at
        the rates a training loop produces. ``expand`` turns chunks into
        ``events`` rows later, when the pipe is idle or after the run.
        """
        if self.error is not None or not data:
            return
        try:
            chunk = _chunks.parse(data, layout)
            self._begin()
            self.con.execute("INSERT INTO event_chunks VALUES (?, ?, ?, ?)",
                             (chunk.first, chunk.n, data, layout))
            self._index(chunk)
            self._pending += chunk.n
            self._new_backlog += chunk.n
        except (sqlite3.Error, OSError, ValueError, OverflowError, TypeError) as exc:
            self._fail(exc)

    def _index(self, chunk: _chunks.RowChunk | _chunks.ColumnChunk) -> None:
        # Side indexes instead of per-row B-trees, written as the chunk
        # arrives so step and time queries work before expansion: time_index
        # rows (min/max time of a run of events), per step its first/last seq.
        self.con.executemany("INSERT OR REPLACE INTO time_index VALUES (?, ?, ?, ?)",
                             chunk.time_bounds())
        self._note_steps(chunk, 0, chunk.n)

    def _note_steps(self, chunk: _chunks.RowChunk | _chunks.ColumnChunk, i: int, j: int) -> None:
        """Notes the steps of events [i, j): halves a range until it holds one step, so
        k step boundaries cost O(k log n) column reads, not a Python loop per event."""
        lo, hi = chunk.bounds("step", i, j)
        if lo == hi:
            self._note_step(lo, chunk.first + i, chunk.first + j - 1)
        else:
            mid = (i + j) // 2
            self._note_steps(chunk, i, mid)
            self._note_steps(chunk, mid, j)

    def expand(self, chunks: int = 1) -> None:
        """Moves up to ``chunks`` of the oldest chunks into ``events``, then commits.

        Rows in and chunk out in one transaction: a crash at any point
        leaves each event exactly once, either as a row or in its chunk.
        """
        if self.error is not None:
            return
        try:
            self._begin()
            found = self.con.execute(
                "SELECT first_seq, rows, layout FROM event_chunks ORDER BY first_seq LIMIT ?",
                (chunks,)).fetchall()
            for first, data, layout in found:
                self._insert(_chunks.parse(data, layout))
                self.con.execute("INSERT OR REPLACE INTO event_columns "
                                 "SELECT * FROM event_chunks WHERE first_seq = ?", (first,))
                self.con.execute("DELETE FROM event_chunks WHERE first_seq = ?", (first,))
        except (sqlite3.Error, OSError, ValueError, OverflowError, struct.error) as exc:
            self._fail(exc)
            return
        self.commit()
        if not found:  # nothing left whatever the count says: never loop on it
            self.backlog = 0

    def finish(self) -> None:
        """Expands every chunk left, guards the copies kept in ``event_columns`` with
        COPY_TRIGGERS, and marks the ``events`` table complete (``expanded``)."""
        self.commit()
        while self.error is None and self.backlog:
            self.expand(8)
        if self.error is None:
            self._begin()
            try:
                for statement in TRIGGERS_SQL.splitlines():
                    self.con.execute(statement)
                self.con.execute("INSERT OR REPLACE INTO metadata VALUES ('expanded', '1')")
            except (sqlite3.Error, OSError) as exc:
                self._fail(exc)
            self.commit()

    def _insert(self, chunk: _chunks.RowChunk | _chunks.ColumnChunk) -> None:
        groups, rest = chunk.row_groups(_GROUP)
        self.con.executemany(_insert_sql(_GROUP), groups)
        if rest:
            self.con.execute(_insert_sql(len(rest) // len(EVENT_COLUMNS)), rest)
        self._expanded += chunk.n

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
                                    ("contexts", "contexts", 2), ("marks", "marks", 4),
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
        """Commits; with ``checkpoint`` folds the WAL into the file and leaves it in
        rollback-journal mode: one self-contained file, which opens read-only
        without creating ``-shm`` (read-only media, directories and files)."""
        self.commit()
        try:
            if checkpoint and self.error is None:
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                try:
                    # Needs the only connection: with a reader attached the file
                    # stays in WAL mode (still complete; readers then need -shm).
                    self.con.execute("PRAGMA journal_mode=DELETE").fetchall()
                except sqlite3.OperationalError:
                    pass
            self.con.close()
        except (sqlite3.Error, OSError) as exc:
            self._fail(exc)


class _Input:
    """Exact-size reads from a pipe, and whether more bytes wait (to commit when idle)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()
        self.pos = 0

    #: Reads at least this big go from the pipe straight into their own
    #: buffer; smaller ones (frame headers) are served from a read-ahead.
    DIRECT_BYTES = 1 << 16

    def read(self, n: int) -> bytes | bytearray | None:
        """Exactly ``n`` bytes, or None at EOF.

        Event pieces are copied once, from the pipe into the returned
        buffer: the writer's own copies cost as much as SQLite's work.
        """
        have = len(self.buf) - self.pos
        if n >= self.DIRECT_BYTES and have < n:
            out = bytearray(n)
            view = memoryview(out)
            view[:have] = memoryview(self.buf)[self.pos:]
            self.buf.clear()
            self.pos = 0
            got = have
            while got < n:
                k = os.readv(self.fd, [view[got:]])
                if not k:
                    return None
                got += k
            return out
        while len(self.buf) - self.pos < n:
            if self.pos:
                del self.buf[:self.pos]
                self.pos = 0
            # Read-ahead of DIRECT_BYTES only: bigger frames skip the buffer, and
            # a 1 MiB read-ahead kept ~2 MiB of buffers in the writer (issue 12).
            chunk = os.read(self.fd, max(n - len(self.buf), self.DIRECT_BYTES))
            if not chunk:
                return None
            self.buf += chunk
        out = bytes(memoryview(self.buf)[self.pos:self.pos + n])
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


def serve(in_fd: int, out_fd: int, path: str, options: dict,
          child: bool = False) -> TraceWriter | None:
    """Writes frames from ``in_fd`` into ``path`` until CLOSE (returns None) or EOF.

    On EOF the last transaction is committed and the writer is returned with
    its connection open: the child then exits without checkpointing, a
    thread closes it. ``child``: this is the writer process, which may
    lower its own priority for the expansion after the run.
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
        if w.warning:
            _reply(out_fd, {"warning": w.warning, "written": w.written})
            w.warning = ""  # said once

    # By default chunks are expanded into rows only after the run: the
    # pump hands over every 200 ms, so a quiet-pipe rule still expanded
    # during most runs, and on a machine whose cores training keeps busy
    # that took CPU from it (86-145 stalls of 3.5-9 ms per 4,000 small-MLP
    # steps, issue 12). With expand_idle, chunks are expanded while the pipe
    # is idle, one chunk (~16 ms) at a time, after EXPAND_QUIET_S without a
    # frame, at most EXPAND_DUTY of the time; the in-process thread never
    # does (it would take the training thread's GIL).
    expand_idle = bool(options.get("expand_idle", False))

    def finish() -> None:
        if child and w.backlog > BACKGROUND_BACKLOG:
            _lower_priority()
        w.finish()

    last_frame = time.monotonic()
    next_expand = 0.0  # keeps expansion to EXPAND_DUTY of the time
    while True:
        idle = not inp.waiting()
        if w.due(idle=idle):
            w.commit()
        check()
        if idle and expand_idle and w.backlog and w.error is None:
            now = time.monotonic()
            wait = max(EXPAND_QUIET_S - (now - last_frame), next_expand - now)
            if wait <= 0:
                w.expand(1)
                done = time.monotonic()
                next_expand = done + (done - now) * (1 / EXPAND_DUTY - 1)
            else:
                select.select([inp.fd], [], [], wait)
            continue
        head = inp.read(HEADER.size)
        if head is None:
            break
        last_frame = time.monotonic()
        kind, n = HEADER.unpack(head)
        if kind == EVENTS or (kind == COLUMNS and n <= MAX_COLUMNS_BYTES):
            # Rows are stored in pieces of up to 8K; a COLUMNS frame is one chunk.
            layout, piece = ((_chunks.ROWS, _PIECE_BYTES) if kind == EVENTS
                             else (_chunks.COLUMNS, n))
            while n > 0:
                data = inp.read(min(n, piece))
                if data is None:
                    break
                n -= len(data)
                w.write_events(data, layout)
                if w.due(idle=False):
                    w.commit()
            check()
        elif (kind == SIDE and n <= MAX_SIDE_BYTES) or (kind == FLUSH and n == TOKEN.size):
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
            # Everything is committed before the answer; the parent then
            # decides whether to wait while the rest is expanded.
            w.commit()
            check()
            _reply(out_fd, {"closed": 1, "written": w.written, "error": w.error,
                            "backlog": w.backlog})
            finish()
            w.close(checkpoint=True)
            return None
        else:  # cannot resynchronise a byte stream: stop storing, keep answering EOF
            w._fail(ValueError(f"bad frame ({kind!r}, {n} bytes) from the profiler"))
            check()
            while inp.read(1 << 16) is not None:
                pass
            break
    w.commit()
    check()
    finish()  # EOF: the profiler is gone; still leave a complete events table
    return w


def _lower_priority() -> None:
    """Nice EXPAND_NICE for this process and for its autogroup: where Linux
    groups tasks by session (sched_autogroup), a nice value ranks a task only
    within its group, and the writer has a session of its own."""
    try:
        os.nice(EXPAND_NICE)
    except OSError:
        pass
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(EXPAND_NICE))
    except OSError:
        pass


def main(argv: list[str]) -> int:
    # The child lives exactly as long as its stdin: Ctrl-C, SIGTERM or SIGHUP
    # sent to the whole process group must not cut the drain after the
    # parent dies. A file-size limit must be a write error, not a kill.
    for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGXFSZ"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    path = argv[1]
    options = json.loads(argv[2]) if len(argv) > 2 else {}
    if serve(0, 1, path, options, child=True) is None:
        return 0
    # EOF without CLOSE: the profiler died. Everything it sent is committed;
    # exit without closing the connection, which would checkpoint while a
    # reader may already be opening the file. The WAL stays, as after a crash.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
