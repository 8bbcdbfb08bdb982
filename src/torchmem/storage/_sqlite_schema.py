"""The SQLite trace schema (from ``_writer``), ``TraceReader``, and rows back into a TraceDelta.

The file checks, the side records and the metadata are read here; the
events (rows, chunks and their column copies) by ``_event_reads``.
Over 400 lines for a reason: creating and locking a trace file, checking
one, and reading its side records and metadata are one format's reads and
writes outside the events, shared by SQLiteStorage and TraceReader.

Shared by ``SQLiteStorage`` (its reads) and ``load`` (via ``TraceReader``).
docs/trace-format.md documents the same schema for plain SQL; change both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from typing import Any

import numpy as np

from .._contexts import MARK_CATEGORIES, MARK_DTYPE
from .._events import EVENT_DTYPE, STACK_NODE_DTYPE
from .._types import DeviceMemory, GCRecord, NvmlUnavailable, Snapshot
from ..trace import TraceDelta
from . import _chunks
from ._event_reads import _snapshot, _tables, query_events
from .base import TraceFormatError, TraceLockedError

# The writer process imports nothing from torchmem, so the schema lives in
# _writer.py; this module checks it against the binary layouts.
from ._writer import (  # noqa: E402
    EVENT_COLUMNS,
    FORMAT,
    GC_COLUMNS,
    OOM_COLUMNS,
    ROW_BYTES,
    SCHEMA,
    SCHEMA_VERSION,
    check_path_length,
    sqlite_uri,
)

assert EVENT_COLUMNS == tuple(n for n in EVENT_DTYPE.names if not n.startswith("_"))
assert ROW_BYTES == EVENT_DTYPE.itemsize
assert {name for name, _ in _chunks.CHUNK_COLUMNS} < set(EVENT_COLUMNS)
assert GC_COLUMNS == tuple(f.name for f in dataclasses.fields(GCRecord))

SQLITE_MAGIC = b"SQLite format 3\x00"


def to_json(value: Any) -> str:
    """JSON for metadata and snapshot fields (dataclasses become dicts)."""
    def default(o: Any) -> Any:
        if dataclasses.is_dataclass(o):
            return dataclasses.asdict(o)
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        return str(o)
    return json.dumps(value, default=default, sort_keys=True)


def snapshot_row(index: int, s: Snapshot) -> tuple:
    return (index, s.timestamp_ns, s.step, s.current_usage_bytes, s.peak_usage_bytes,
            to_json(s.usage_by_type), to_json({str(k): v for k, v in s.usage_by_device.items()}),
            to_json(s.devices))


_DEVICE_FIELDS = tuple(f.name for f in dataclasses.fields(DeviceMemory))


def _devices_from_json(text: str | None) -> Any:
    value = _json_or(text, None) if text else None
    if isinstance(value, list):
        # A newer trace's extra fields are dropped; a missing one leaves the
        # plain dict, which from_trace then counts as malformed.
        return [DeviceMemory(**{k: d[k] for k in _DEVICE_FIELDS})
                if isinstance(d, dict) and all(k in d for k in _DEVICE_FIELDS) else d
                for d in value]
    if isinstance(value, str) and value.startswith("unavailable: "):
        return NvmlUnavailable(value[len("unavailable: "):])
    return value


def _int_keys(value: Any) -> Any:
    """``{"0": n}`` (JSON keys are strings) as ``{0: n}``; anything else as it is."""
    if not isinstance(value, dict):
        return value
    try:
        return {int(k): v for k, v in value.items()}
    except (TypeError, ValueError):
        return value


def _by_index(rows: list[tuple], build: Any, start: int = 0) -> list[Any]:
    """Side records placed at their index (column 0), so marker events, which hold
    that index, still find them: a missing or unbuildable row is None (counted
    and skipped by ``MemoryProfiler.from_trace``), an index that no run
    could have written (negative, far past the row count) is None at the end.
    ``start``: the first index read (the list holds the records from it on)."""
    out: list[Any] = []
    late = 0
    for row in rows:
        index = row[0] - start if type(row[0]) is int else None
        if type(index) is not int or index < len(out) or index > len(rows) * 2 + 16:
            late += 1
            continue
        out.extend([None] * (index - len(out)))
        try:
            out.append(build(*row[1:]))
        except (TypeError, ValueError, AttributeError):
            out.append(None)
    return out + [None] * late


def _json_or(text: Any, default: Any) -> Any:
    """``text`` decoded as JSON; ``default`` when it is missing, ``_UNREADABLE`` when
    it is not JSON (``from_trace`` counts and skips what has the wrong shape)."""
    if text is None:
        return default
    try:
        return json.loads(text)
    except (ValueError, TypeError, RecursionError):
        return _UNREADABLE


#: Stands for side-record JSON that does not parse (never a valid record).
_UNREADABLE = object()


def _oom_from_row(*row: Any) -> dict | None:
    oom = dict(zip(OOM_COLUMNS, row[:-1]))
    extra = _json_or(row[-1], {}) if row[-1] else {}
    if not isinstance(extra, dict):
        return None  # from_trace counts it
    oom.update(extra)
    return oom


def oom_row(index: int, oom: dict) -> tuple:
    extra = {k: v for k, v in oom.items() if k not in OOM_COLUMNS}
    return (index, *(oom.get(c) for c in OOM_COLUMNS), to_json(extra) if extra else None)


def create_private_file(path: str, overwrite: bool, own_fd: int | None = None) -> int:
    """Creates ``path`` empty with mode 0600 before SQLite opens it, and returns a
    descriptor of it holding an exclusive ``flock``: the writer's lock.

    Traces hold source paths and function names, so only the owner may
    read them; SQLite gives its -wal and -shm files the same mode. The lock
    (a BSD lock, which SQLite's own POSIX locks do not see) lives as long as
    a descriptor of it is open: this one, and the writer child's copy of it.
    A trace whose lock another writer holds is never replaced, whatever
    ``overwrite`` says (TraceLockedError). ``own_fd``: the caller already
    holds the lock on ``path`` (it starts again after a failed writer start).
    """
    if own_fd is not None:
        _remove_sidecars(path)
        os.ftruncate(own_fd, 0)
        return own_fd
    if os.path.lexists(path):
        _refuse_if_locked(path, overwrite)
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        os.remove(path)
        _remove_sidecars(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.chmod(path, 0o600)  # whatever the umask was
        if not _try_lock(fd):
            raise TraceLockedError(f"{path}: created and at once locked by another writer")
        # Another process may have replaced the name between create and lock.
        if os.fstat(fd).st_ino != os.stat(path).st_ino:
            raise TraceLockedError(f"{path}: replaced by another writer while being created")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _remove_sidecars(path: str) -> None:
    for suffix in ("-wal", "-shm", "-journal"):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass


def _try_lock(fd: int) -> bool:
    """An exclusive flock without waiting: False when another holds it. Where the
    filesystem has no flock the trace goes unlocked (True)."""
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: no locks here
        return True
    return True


def _refuse_if_locked(path: str, overwrite: bool) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return  # a dangling link, a file we cannot read: nothing holds a lock we could test
    try:
        if _try_lock(fd):
            return
    finally:
        os.close(fd)  # releases a lock we took: it only tested
    pid = _writer_pid(path)
    who = f" (pid {pid})" if pid else ""
    raise TraceLockedError(
        f"{path} is being written by another process{who}; torchmem will not "
        f"{'replace' if overwrite else 'share'} a trace while its writer runs "
        f"(overwrite or not): wait for it to finish, or write to another file")


def _writer_pid(path: str) -> int | None:
    """The pid the trace's metadata names (the training process), if readable."""
    try:
        con = sqlite3.connect(sqlite_uri(path, mode="ro"), uri=True)
        try:
            row = con.execute("SELECT value FROM metadata WHERE key = 'pid'").fetchone()
        finally:
            con.close()
        value = json.loads(row[0]) if row else None
        return value if type(value) is int else None
    except (sqlite3.Error, ValueError, TypeError):
        return None


def check_file(path: str) -> None:
    """Raises TraceFormatError unless ``path`` looks like a whole SQLite file."""
    if not os.path.exists(path):
        raise TraceFormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise TraceFormatError(f"{path}: is a directory, not a torchmem trace")
    try:
        check_path_length(path)
    except ValueError as exc:
        raise TraceFormatError(str(exc)) from None
    size = os.path.getsize(path)
    if size == 0:
        raise TraceFormatError(f"{path}: empty file, not a torchmem trace")
    with open(path, "rb") as f:
        header = f.read(100)
    if not header.startswith(SQLITE_MAGIC):
        raise TraceFormatError(f"{path}: not a torchmem trace (not an SQLite database)")
    if len(header) < 100:
        raise TraceFormatError(f"{path}: truncated trace ({size} bytes, header incomplete)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    valid = header[24:28] == header[92:96]  # the in-header size is trusted only then
    # A live writer's checkpoint writes page 1 (the new size) before it
    # extends the file; with a WAL beside it SQLite itself checks the rest.
    if os.path.exists(path + "-wal") and os.path.getsize(path + "-wal") > 0:
        valid = False
    if page_size < 512 or size % page_size or (valid and size < pages * page_size):
        raise TraceFormatError(
            f"{path}: truncated trace ({size} bytes; expected {pages * page_size})")


def read_metadata(con: sqlite3.Connection, path: str) -> dict[str, Any]:
    """The metadata table as a dict; raises TraceFormatError for foreign files."""
    try:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "metadata" not in tables or "events" not in tables:
            raise TraceFormatError(f"{path}: not a torchmem trace (an SQLite file without "
                                   f"torchmem tables)")
        # anomaly_examples is a side record kept in this table (read_delta reads
        # it, and skips it when malformed), not run metadata.
        meta = {k: json.loads(v) for k, v in con.execute(
            "SELECT key, value FROM metadata WHERE key != 'anomaly_examples'")}
    except sqlite3.DatabaseError as exc:
        raise TraceFormatError(f"{path}: corrupt trace ({one_line(exc)})") from None
    except (ValueError, TypeError) as exc:  # TypeError: a NULL or BLOB value
        raise TraceFormatError(f"{path}: corrupt trace metadata ({one_line(exc)})") from None
    if meta.get("format") != FORMAT:
        raise TraceFormatError(f"{path}: not a torchmem trace (format {meta.get('format')!r})")
    version = meta.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise TraceFormatError(f"{path}: trace schema {version!r} is newer than this "
                               f"torchmem reads ({SCHEMA_VERSION}); upgrade torchmem")
    return meta


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def read_delta(con: sqlite3.Connection, since: dict[str, int] | None = None,
               max_events: int | None = None) -> TraceDelta:
    """The stored trace as one TraceDelta: all of it, or what follows ``since``.

    ``since`` holds the first index wanted of each part (``seq``, ``frames``,
    ``nodes``, ``contexts``, ``marks``, ``gc``, ``snapshots``, ``ooms``; 0 when
    absent), as
    ``TraceDelta`` numbers them; ``max_events`` caps the events read.
    Everything comes from one read transaction, so every stack id and side
    record the events use is there.
    """
    with _snapshot(con):
        return _read_delta(con, since or {}, max_events)


def _read_delta(con: sqlite3.Connection, since: dict[str, int],
                max_events: int | None) -> TraceDelta:
    seq0, f0, n0 = since.get("seq", 0), since.get("frames", 0), since.get("nodes", 0)
    d = TraceDelta(events=query_events(
        con, start_seq=seq0 or None,
        before_seq=None if max_events is None else seq0 + max_events))
    d.type_names = [n for _, n in con.execute("SELECT type_id, name FROM types ORDER BY type_id")]
    d.frames_start = f0
    d.frames = [(f, int(line), fn) for f, line, fn in
                con.execute("SELECT filename, lineno, function FROM frames WHERE frame_id >= ? "
                            "ORDER BY frame_id", (f0,))]
    nodes = con.execute("SELECT node_id, parent, frame_id FROM stack_nodes WHERE node_id >= ?",
                        (n0,)).fetchall()
    end = max((n for n, _, _ in nodes), default=max(n0, 1) - 1) + 1
    # Node ids are written without gaps; a far larger id is corruption, and
    # allocating for it could ask for terabytes.
    if not isinstance(end, int) or end - n0 > len(nodes) + (n0 == 0):
        raise ValueError(f"stack node id {end - 1} with only {len(nodes)} nodes stored")
    d.nodes_start = n0
    d.stack_nodes = np.zeros(end - n0, STACK_NODE_DTYPE)  # node 0 is the root
    for n, parent, frame in nodes:
        d.stack_nodes[n - n0] = (parent, frame)
    tables = _tables(con)
    if "contexts" in tables:  # schema 5
        c0 = since.get("contexts", 0)
        rows = con.execute("SELECT context_id, module, phase FROM contexts WHERE context_id >= ? "
                           "ORDER BY context_id", (c0,)).fetchall()
        if rows and rows[-1][0] != len(rows) - 1 + rows[0][0]:
            raise ValueError("context ids are not consecutive")
        d.contexts_start = rows[0][0] if rows else c0
        d.contexts = [(str(m), str(ph)) for _, m, ph in rows]
    if "marks" in tables:
        d.marks_start = since.get("marks", 0)
        # A part of the events gets only the marks made while they were
        # recorded (a mark holds from its seq on), so none names a later event.
        upto = 2**63 - 1 if max_events is None else seq0 + len(d.events)
        d.marks = [(int(a), int(b), str(c), int(e)) for a, b, c, e in con.execute(
            "SELECT seq, address, category, context_id FROM marks WHERE mark_index >= ? "
            "AND seq <= ? ORDER BY mark_index", (d.marks_start, upto))]
    # Side records are built as they are, whatever their values: from_trace
    # keeps the well-formed ones (torchmem._records) and counts the rest.
    d.gc_start = since.get("gc", 0)
    d.gc_records = _side_range(con, "gc", d.gc_start)
    d.snapshots_start = since.get("snapshots", 0)
    d.snapshots = _side_range(con, "snapshots", d.snapshots_start)
    d.ooms_start = since.get("ooms", 0)
    d.ooms = _by_index(con.execute(
        f"SELECT oom_index, {', '.join(OOM_COLUMNS)}, extra FROM ooms WHERE oom_index >= ? "
        "ORDER BY oom_index", (d.ooms_start,)).fetchall(), _oom_from_row, d.ooms_start)
    d.anomalies = dict(con.execute("SELECT kind, count FROM anomalies"))
    row = con.execute("SELECT value FROM metadata WHERE key = 'anomaly_examples'").fetchone()
    d.anomaly_examples = _json_or(row[0] if row else None, [])
    return d


def _snapshot_from_row(ts: Any, step: Any, cur: Any, peak: Any, by_type: Any, by_dev: Any,
                       devices: Any) -> Snapshot:
    return Snapshot(timestamp_ns=ts, step=step, current_usage_bytes=cur, peak_usage_bytes=peak,
                    usage_by_type=_json_or(by_type, None),
                    usage_by_device=_int_keys(_json_or(by_dev, None)),
                    devices=_devices_from_json(devices))


# kind -> (SELECT of the index column first and the record's columns, the index
# column, the builder of a record from the columns after the index)
_SIDE_SELECTS: dict[str, tuple[str, str, Any]] = {
    "gc": (f"SELECT gc_index, {', '.join(GC_COLUMNS)} FROM gc_records", "gc_index", GCRecord),
    "snapshots": ("SELECT snapshot_index, timestamp_ns, step, current_usage_bytes, "
                  "peak_usage_bytes, usage_by_type, usage_by_device, devices FROM snapshots",
                  "snapshot_index", _snapshot_from_row),
}


def _side_range(con: sqlite3.Connection, kind: str, start: int,
                end: int | None = None) -> list[Any]:
    """The ``kind`` records (``"gc"``, ``"snapshots"``) with index in [start, end),
    placed by index as ``_by_index`` places them."""
    select, column, build = _SIDE_SELECTS[kind]
    where, args = f" WHERE {column} >= ?", [start]
    if end is not None:
        where, args = where + f" AND {column} < ?", args + [end]
    rows = con.execute(select + where + f" ORDER BY {column}", args).fetchall()
    return _by_index(rows, build, start)


# A mark's category text as its MARK_CATEGORIES code (unknown: 0, "none"), in SQL.
_CATEGORY_CODE = ("CASE category " + " ".join(
    f"WHEN '{c}' THEN {i}" for i, c in enumerate(MARK_CATEGORIES)) + " ELSE 0 END")


def read_side_records(con: sqlite3.Connection, kind: str, start: int, end: int) -> Any:
    """Side records with index in [start, end) of a trace (what a live profiler
    released from memory once stored): ``"marks"`` as a MARK_DTYPE array,
    ``"gc"`` as GCRecords, ``"snapshots"`` as Snapshots; a record not stored
    (yet) is missing, so the array may be short (marks) or the list hold None
    (the others)."""
    with _snapshot(con):
        if kind == "marks":
            if "marks" not in _tables(con):
                return np.zeros(0, MARK_DTYPE)
            # The category as its code in SQL and the rows straight into the
            # array: 4 us a mark through tuples and marks_array, ~1 us so.
            return np.array(con.execute(
                f"SELECT seq, address, {_CATEGORY_CODE}, context_id FROM marks "
                "WHERE mark_index >= ? AND mark_index < ? ORDER BY mark_index",
                (start, end)).fetchall(), MARK_DTYPE)
        return _side_range(con, kind, start, end)


def end_seq(con: sqlite3.Connection) -> int:
    """One past the last stored seq (rows and chunks), without reading the events."""
    with _snapshot(con):
        last = con.execute("SELECT MAX(seq) FROM events").fetchone()[0]
        ends = [int(last) + 1 if last is not None else 0]
        if "event_chunks" in _tables(con):
            end = con.execute("SELECT MAX(first_seq + n) FROM event_chunks").fetchone()[0]
            if end is not None:
                ends.append(int(end))
    return max(ends)


def first_seq_from(con: sqlite3.Connection, seq: int) -> int | None:
    """The smallest stored seq >= ``seq`` (rows or chunks), None if there is none."""
    seq = min(int(seq), 2**63 - 1)
    with _snapshot(con):
        found = [con.execute("SELECT MIN(seq) FROM events WHERE seq >= ?", (seq,)).fetchone()[0]]
        if "event_chunks" in _tables(con):
            found.append(con.execute("SELECT MIN(first_seq) FROM event_chunks WHERE "
                                     "first_seq + n > ?", (seq,)).fetchone()[0])
    found = [int(f) for f in found if f is not None]
    return max(min(found), seq) if found else None


def read_side(con: sqlite3.Connection) -> TraceDelta:
    """Everything but the events (types, stacks, GC, snapshots, OOMs, anomalies)."""
    with _snapshot(con):
        d = _read_delta(con, {}, 0)
        if "marks" in _tables(con):  # every mark: the events come later, by range
            d.marks = [(int(a), int(b), str(c), int(e)) for a, b, c, e in con.execute(
                "SELECT seq, address, category, context_id FROM marks ORDER BY mark_index")]
        return d


def connect(path: str) -> sqlite3.Connection:
    """A read-only connection to the trace at ``path``; never creates or changes it.

    A trace in rollback-journal mode (closed cleanly) or in WAL mode with its
    ``-shm`` in place opens read-only anywhere. A WAL-mode file whose
    ``-shm`` cannot be created (read-only directory or media) opens as
    immutable when it has no write-ahead log left to apply; otherwise it
    cannot be read there, and TraceFormatError says so.
    """
    try:
        check_path_length(path)
    except ValueError as exc:
        raise TraceFormatError(str(exc)) from None
    try:
        return _open(sqlite_uri(path, mode="ro"))
    except sqlite3.OperationalError as exc:
        first = exc
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        why = ("" if os.access(os.path.dirname(os.path.abspath(path)), os.W_OK)
               else " in a read-only directory")
        raise TraceFormatError(
            f"{path}: cannot read it here: its write-ahead log {wal} holds events not yet in "
            f"the file, and SQLite must create {path}-shm to read it{why} (read-only storage; "
            f"{one_line(first)}); copy the trace with its -wal to writable storage") from None
    try:
        # Nothing to apply from a WAL: the file alone is the whole trace.
        return _open(sqlite_uri(path, mode="ro", immutable="1"))
    except sqlite3.OperationalError:
        raise TraceFormatError(f"{path}: cannot open trace ({one_line(first)})") from None


def _open(uri: str) -> sqlite3.Connection:
    con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        con.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchall()
    except BaseException:
        con.close()
        raise
    return con


class TraceReader:
    """Read access to a saved trace; every problem is a one-line TraceFormatError."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        check_file(self.path)
        try:
            self._con = connect(self.path)
        except (sqlite3.DatabaseError, ValueError) as exc:  # ValueError: undecodable schema text
            raise TraceFormatError(f"{self.path}: cannot open trace ({one_line(exc)})") \
                from None
        try:
            self._meta = read_metadata(self._con, self.path)
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
        except (sqlite3.DatabaseError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, OverflowError) as exc:  # hostile values in any column
            raise TraceFormatError(f"{self.path}: corrupt trace ({one_line(exc)})") \
                from None

    def read_events(self, *, before_seq: int | None = None, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Stored events matching the filters (steps inclusive, time in epoch ns), by seq."""
        return self._guard(query_events, before_seq=before_seq, start_step=start_step,
                           end_step=end_step, since_ns=since_ns)

    def read_seq_range(self, from_seq: int, before_seq: int, *, start_step: int | None = None,
                       end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Stored events with ``from_seq <= seq < before_seq`` matching the filters, by seq."""
        return self._guard(query_events, start_seq=from_seq, before_seq=before_seq,
                           start_step=start_step, end_step=end_step, since_ns=since_ns)

    def end_seq(self) -> int:
        """One past the last stored seq (0 for a trace without events)."""
        return self._guard(end_seq)

    def first_seq_from(self, seq: int) -> int | None:
        """The smallest stored seq >= ``seq``, None if there is none."""
        return self._guard(first_seq_from, seq)

    def read_side(self) -> TraceDelta:
        """The trace without its events (those are read by range when asked)."""
        return self._guard(read_side)

    def read_trace(self) -> TraceDelta:
        """The whole trace as one TraceDelta."""
        return self._guard(read_delta)

    def close(self) -> None:
        self._con.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
