"""The SQLite trace schema, and turning its rows back into a TraceDelta.

Shared by the writer (``SQLiteStorage``) and the reader (``TraceReader``).
docs/trace-format.md documents the same schema for plain SQL; change both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from typing import Any

import numpy as np

from .._events import EVENT_DTYPE, STACK_NODE_DTYPE, empty_events
from .._types import GCRecord, Snapshot
from ..trace import TraceDelta
from .base import TraceFormatError

FORMAT = "torchmem-trace"
SCHEMA_VERSION = 1

#: Event columns in table order: every EVENT_DTYPE field but the padding.
EVENT_COLUMNS = tuple(n for n in EVENT_DTYPE.names if not n.startswith("_"))
GC_COLUMNS = tuple(f.name for f in dataclasses.fields(GCRecord))
OOM_COLUMNS = ("seq", "timestamp_ns", "requested_bytes", "device", "stream",
               "device_free_bytes", "device_total_bytes", "live_bytes", "stack_id")

SCHEMA = f"""
CREATE TABLE metadata (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
  seq INTEGER PRIMARY KEY, timestamp_ns INTEGER NOT NULL, address INTEGER NOT NULL,
  size INTEGER NOT NULL, stream INTEGER NOT NULL, step INTEGER NOT NULL,
  total_allocated INTEGER NOT NULL, total_freed INTEGER NOT NULL,
  thread_id INTEGER NOT NULL, stack_id INTEGER NOT NULL, type_id INTEGER NOT NULL,
  device INTEGER NOT NULL, kind INTEGER NOT NULL);
CREATE INDEX events_by_step ON events (step);
CREATE INDEX events_by_time ON events (timestamp_ns);
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

INSERT_EVENTS = (f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
                 f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
#: struct format of the int64 rows ``events_to_int64`` produces.
EVENT_ROW_FORMAT = "<" + "q" * len(EVENT_COLUMNS)

SQLITE_MAGIC = b"SQLite format 3\x00"


def events_to_int64(events: np.ndarray) -> bytes:
    """Event rows as packed little-endian int64s in EVENT_COLUMNS order.

    SQLite integers are signed 64-bit: unsigned columns are stored
    bit-for-bit, so a value >= 2**63 (none is expected: the API rejects
    such addresses and sizes) reads back exactly instead of failing.
    """
    out = np.empty((len(events), len(EVENT_COLUMNS)), dtype="<i8")
    for i, name in enumerate(EVENT_COLUMNS):
        out[:, i] = events[name].astype(np.int64, casting="unsafe")
    return out.tobytes()


def rows_to_events(rows: list[tuple]) -> np.ndarray:
    """EVENT_DTYPE array from rows selected in EVENT_COLUMNS order."""
    if not rows:
        return empty_events()
    table = np.array(rows, dtype=np.int64).reshape(len(rows), len(EVENT_COLUMNS))
    out = np.zeros(len(rows), dtype=EVENT_DTYPE)
    for i, name in enumerate(EVENT_COLUMNS):
        out[name] = table[:, i].astype(EVENT_DTYPE[name], casting="unsafe")
    return out


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


def _devices_from_json(text: str | None) -> Any:
    value = json.loads(text) if text else None
    if isinstance(value, list):
        try:
            from ..sources.nvml import DeviceMemory
            return [DeviceMemory(**d) if isinstance(d, dict) else d for d in value]
        except Exception:  # an older/newer field set: keep the plain dicts
            return value
    if isinstance(value, str) and value.startswith("unavailable: "):
        try:
            from ..sources.nvml import NvmlUnavailable
            return NvmlUnavailable(value[len("unavailable: "):])
        except Exception:
            return value
    return value


def oom_row(index: int, oom: dict) -> tuple:
    extra = {k: v for k, v in oom.items() if k not in OOM_COLUMNS}
    return (index, *(oom.get(c) for c in OOM_COLUMNS), to_json(extra) if extra else None)


def create_private_file(path: str, overwrite: bool) -> None:
    """Creates ``path`` empty with mode 0600 before SQLite opens it.

    Traces hold source paths and function names, so only the owner may
    read them; SQLite gives its -wal and -shm files the same mode.
    """
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.remove(path + suffix)
            except FileNotFoundError:
                pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.close(fd)
    os.chmod(path, 0o600)  # whatever the umask was


def check_file(path: str) -> None:
    """Raises TraceFormatError unless ``path`` looks like a whole SQLite file."""
    if not os.path.exists(path):
        raise TraceFormatError(f"{path}: no such file")
    if os.path.isdir(path):
        raise TraceFormatError(f"{path}: is a directory, not a torchmem trace")
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
        meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM metadata")}
    except sqlite3.DatabaseError as exc:
        raise TraceFormatError(f"{path}: corrupt trace ({one_line(exc)})") from None
    except ValueError as exc:
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


def query_events(con: sqlite3.Connection, *, before_seq: int | None = None,
                 start_step: int | None = None, end_step: int | None = None,
                 since_ns: int | None = None) -> np.ndarray:
    """Selected events as an EVENT_DTYPE array, by seq."""
    where, args = [], []
    if before_seq is not None:
        where.append("seq < ?")
        args.append(min(int(before_seq), 2**63 - 1))
    if start_step is not None:
        where.append("step >= ?")
        args.append(int(start_step))
    if end_step is not None and end_step < 2**63:
        where.append("step <= ?")
        args.append(int(end_step))
    if since_ns is not None:
        where.append("timestamp_ns >= ?")
        args.append(int(since_ns))
    sql = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
    if where:
        sql += " WHERE " + " AND ".join(where)
    return rows_to_events(con.execute(sql + " ORDER BY seq", args).fetchall())


def read_delta(con: sqlite3.Connection) -> TraceDelta:
    """The whole stored trace as one TraceDelta (seq, frames and nodes from 0)."""
    d = TraceDelta(events=query_events(con))
    d.type_names = [n for _, n in con.execute("SELECT type_id, name FROM types ORDER BY type_id")]
    d.frames = [(f, int(line), fn) for f, line, fn in
                con.execute("SELECT filename, lineno, function FROM frames ORDER BY frame_id")]
    nodes = con.execute("SELECT node_id, parent, frame_id FROM stack_nodes").fetchall()
    size = max((n for n, _, _ in nodes), default=0) + 1
    d.stack_nodes = np.zeros(size, STACK_NODE_DTYPE)  # node 0 is the root
    for n, parent, frame in nodes:
        d.stack_nodes[n] = (parent, frame)
    d.gc_records = [GCRecord(*r) for r in con.execute(
        f"SELECT {', '.join(GC_COLUMNS)} FROM gc_records ORDER BY gc_index")]
    d.snapshots = [
        Snapshot(timestamp_ns=ts, step=step, current_usage_bytes=cur, peak_usage_bytes=peak,
                 usage_by_type=json.loads(by_type),
                 usage_by_device={int(k): v for k, v in json.loads(by_dev).items()},
                 devices=_devices_from_json(devices))
        for ts, step, cur, peak, by_type, by_dev, devices in con.execute(
            "SELECT timestamp_ns, step, current_usage_bytes, peak_usage_bytes, usage_by_type, "
            "usage_by_device, devices FROM snapshots ORDER BY snapshot_index")]
    d.ooms = []
    for row in con.execute(f"SELECT {', '.join(OOM_COLUMNS)}, extra FROM ooms ORDER BY oom_index"):
        oom = dict(zip(OOM_COLUMNS, row[:-1]))
        if row[-1]:
            oom.update(json.loads(row[-1]))
        d.ooms.append(oom)
    d.anomalies = dict(con.execute("SELECT kind, count FROM anomalies"))
    return d
