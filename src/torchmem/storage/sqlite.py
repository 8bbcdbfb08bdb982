"""SQLiteStorage: a durable, crash-safe trace written by a child process.

Over 400 lines on purpose: one class, whose pipe, sender thread, reply thread
and writer-process lifecycle share one condition variable and the counters
it guards (queued, sent, acknowledged); split apart, they would share that
private state across modules.

Each ``append`` (the profiler's pump calls it every flush interval, 200 ms
by default) turns the delta into frames: the event rows as the recorder's
raw bytes (no per-event Python work), the side records as JSON. A sender
thread writes them to a pipe; the writer child (``_writer.py``) stores them
in transactions in WAL mode. The training process thus pays no GIL time for
SQLite's per-value binding. WAL makes every commit survive a crash of either
process; when the training process dies (SIGKILL included) the child still
stores and commits everything already sent, then exits.

``flush()`` is a handshake: a FLUSH frame, answered once everything before
it is committed. Write errors (disk full, I/O errors) produce one warning;
the profiler goes on in memory and nothing raises into the training run. If
the child cannot start, the same writer runs in a thread of this process
(with a warning), as it did before the child existed.
"""

from __future__ import annotations

import collections
import json
import os
import sqlite3
import subprocess
import sys
import threading
import warnings
import weakref
from typing import Any

import numpy as np

from .._events import EVENT_DTYPE
from .._io import write_all as _write_all
from ..trace import TraceDelta
from . import _event_reads, _sqlite_schema as schema
from . import _writer
from ._sqlite_schema import TraceReader, connect as _connect

__all__ = ["SQLiteStorage", "TraceReader"]

_F_SETPIPE_SZ = 1031  # Linux: a 1 MiB pipe lets one hand-over flow with fewer wake-ups
#: Seconds to wait for the child's "ready" line before falling back to a thread.
START_TIMEOUT_S = 20.0
#: Seconds ``close`` waits for the child to commit what it was sent.
CLOSE_TIMEOUT_S = 300.0
#: ``close()`` waits for the expansion of chunks into rows only when at most
#: this many events are left (~0.1 s of writer time): a small trace is then
#: final when close returns; a big one is finished by the child on its own.
CLOSE_WAIT_BACKLOG = _writer.BACKGROUND_BACKLOG


def _writer_command(path: str, options: dict) -> list[str]:
    """The child's command line (tests replace this to make the start fail)."""
    return [sys.executable, "-I", "-S", os.path.abspath(_writer.__file__), path,
            json.dumps(options)]


def _side_payload(d: TraceDelta, n_types: int, meta: list | None = None) -> bytes | None:
    """The side records of ``d`` as one JSON frame payload (None when there are none)."""
    side: dict[str, Any] = {}
    meta = list(meta or [])
    if d.anomaly_examples:  # a metadata row: the anomalies table holds counts only
        meta.append(("anomaly_examples", schema.to_json(d.anomaly_examples)))
    if meta:
        side["meta"] = meta
    if len(d.type_names) > n_types:
        side["types"] = list(d.type_names)
    if d.frames:
        side["frames"] = [d.frames_start, [(str(f), int(ln), str(fn)) for f, ln, fn in d.frames]]
    if len(d.stack_nodes):
        side["nodes"] = [d.nodes_start, d.stack_nodes.tolist()]
    if d.contexts:
        side["contexts"] = [d.contexts_start, [(str(m), str(ph)) for m, ph in d.contexts]]
    if d.marks:
        side["marks"] = [d.marks_start, [(int(q), int(a), str(c), int(x))
                                         for q, a, c, x in d.marks]]
    if d.gc_records:
        side["gc"] = [d.gc_start, [[getattr(r, c) for c in schema.GC_COLUMNS]
                                   for r in d.gc_records]]
    if d.snapshots:
        side["snapshots"] = [d.snapshots_start, [schema.snapshot_row(0, s)[1:]
                                                 for s in d.snapshots]]
    if d.ooms:
        side["ooms"] = [d.ooms_start, [schema.oom_row(0, _oom_dict(o))[1:] for o in d.ooms]]
    if d.anomalies:
        side["anomalies"] = {str(k): int(v) for k, v in d.anomalies.items()}
    return json.dumps(side, default=_json_default).encode() if side else None


def _oom_dict(o: Any) -> dict:
    # OomEvent (or a plain dict from an older caller).
    return o.as_dict() if hasattr(o, "as_dict") else dict(o)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    return str(o)


def _frame(kind: bytes, payload: bytes) -> bytes:
    return _writer.HEADER.pack(kind, len(payload)) + payload


class SQLiteStorage:
    """Stores a profiler's trace in an SQLite file at ``path``.

    Args:
        path: the trace file; created with mode 0600.
        overwrite: replace an existing file (else FileExistsError).
        batch_interval_ms: the writer waits at least this long between two
            commits while the pipe is idle (0 = commit as soon as it runs
            dry); while data streams in it commits every 100 ms regardless
            of it, or every ``batch_interval_ms`` when that is longer.

    ``write_error`` holds the reason storing stopped (None while healthy);
    ``events_written`` counts committed events (as of the last flush or
    close); ``writer_pid`` is the writer process (None when it runs as a
    thread in this process: ``in_process`` is then True).
    """

    def __init__(self, path: str | os.PathLike, *, overwrite: bool = False,
                 batch_interval_ms: float = 0.0, _pragmas: dict | None = None,
                 _in_process: bool = False, _wal_limit_bytes: int | None = None) -> None:
        self.path = os.fspath(path)
        _writer.check_path_length(self.path)
        # The writer's lock (schema.create_private_file): held by this
        # descriptor and the writer child's copy of it, released when both close.
        self._lock_fd: int | None = schema.create_private_file(self.path, overwrite)
        options = {"batch_interval_ms": float(batch_interval_ms), "pragmas": _pragmas or {},
                   "wal_limit_bytes": _wal_limit_bytes}
        self._metadata: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._outbox: collections.deque = collections.deque()
        # Whole frames go into the pipe under this lock: the sender thread
        # writes queued frames, append_from_recorder writes event frames
        # straight from the recorder on the pump's thread.
        self._pipe_lock = threading.Lock()
        self._fd_open = False
        self._queued = 0  # frames handed to the sender
        self._sent = 0  # frames written whole into the pipe
        self._token = 0  # flush tokens sent
        self._acked = 0  # flush tokens answered
        self._ready = False
        self._dead = False  # the pipe is gone (closed, or the writer died)
        self._closed_ack = False
        self._close_backlog = 0  # unexpanded events when the writer acknowledged CLOSE
        self._n_types = 0
        self._closing = False
        self.closed = False
        self.write_error: str | None = None
        self.events_written = 0
        self.writer_pid: int | None = None
        self.in_process = False
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self._read_lock = threading.Lock()
        self._reader: sqlite3.Connection | None = None
        # _in_process: the writer thread without the child (benchmarks compare them).
        why = None if _in_process else self._start_child(options)
        if _in_process:
            self._start_thread(options)
        elif why is not None:
            # A child that started but never answered may have made the schema.
            schema.create_private_file(self.path, True, own_fd=self._lock_fd)
            self._warn(f"torchmem: cannot start the SQLite writer process ({why}); the trace "
                       f"{self.path} is written by a thread in this process instead")
            self._start_thread(options)
        _live.add(self)

    # -- starting the writer -----------------------------------------------------
    def _start_io(self, data_fd: int, reply_fd: int) -> None:
        self._data_fd, self._reply_fd = data_fd, reply_fd
        self._fd_open = True
        self._sender = threading.Thread(target=self._send_loop, name="torchmem-sqlite-send",
                                        daemon=True)
        self._replies = threading.Thread(target=self._reply_loop, name="torchmem-sqlite-reply",
                                         daemon=True)
        self._sender.start()
        self._replies.start()

    def _start_child(self, options: dict) -> str | None:
        """Starts the writer process; the reason it could not, or None."""
        data_r, data_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(data_w, _F_SETPIPE_SZ, 1 << 20)
        except (ImportError, OSError):
            pass
        try:
            # A new session: the child may outlive the training process while
            # it expands the trace, and must not get the terminal's signals.
            # The child inherits the lock: the trace stays locked while it
            # expands the trace after this process has gone.
            self._proc = subprocess.Popen(_writer_command(self.path, options), stdin=data_r,
                                          stdout=reply_w, close_fds=True,
                                          pass_fds=(self._lock_fd,), start_new_session=True)
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            for fd in (data_r, data_w, reply_r, reply_w):
                os.close(fd)
            return schema.one_line(exc)
        finally:
            if self._proc is not None:
                os.close(data_r)
                os.close(reply_w)
        self._start_io(data_w, reply_r)
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._dead, START_TIMEOUT_S)
            ok = self._ready
        if ok:
            self.writer_pid = self._proc.pid
            return None
        self._stop_io(kill=True)
        code = self._proc.returncode
        self._proc = None
        with self._cond:
            self._dead = False
            self._outbox.clear()
        return f"exit code {code}" if code is not None else "no answer"

    def _start_thread(self, options: dict) -> None:
        data_r, data_w = os.pipe()
        reply_r, reply_w = os.pipe()

        def run() -> None:
            try:
                writer = _writer.serve(data_r, reply_w, self.path,
                                       dict(options, expand_idle=False))
                if writer is not None:
                    writer.close(checkpoint=True)
            finally:
                os.close(data_r)
                os.close(reply_w)
                self._unlock()  # the writer has finished with the file

        self.in_process = True
        self._thread = threading.Thread(target=run, name="torchmem-sqlite", daemon=True)
        self._thread.start()
        self._start_io(data_w, reply_r)
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._dead)

    # -- the StorageBackend protocol -------------------------------------------
    def open(self, metadata: dict[str, Any] | None = None) -> None:
        """Records run metadata; each key becomes one JSON row of ``metadata``."""
        meta = {k: v for k, v in (metadata or {}).items()
                if k not in ("format", "schema_version")}
        self._metadata.update(meta)
        rows = [(k, schema.to_json(v)) for k, v in meta.items()]
        if rows:
            self._send([_frame(_writer.SIDE, json.dumps({"meta": rows}).encode())])

    @property
    def metadata(self) -> dict[str, Any]:
        """The run metadata given to ``open``."""
        return dict(self._metadata)

    def append(self, delta: TraceDelta) -> None:
        """Queues ``delta`` for the writer; never blocks on the disk or the pipe."""
        if self.closed or self.write_error is not None:
            return
        frames = []
        side = self._side_frame(delta)
        if side is not None:
            frames.append(side)  # before the events that use it
        events = np.ascontiguousarray(delta.events, dtype=EVENT_DTYPE)
        if len(events):
            if events.flags.writeable:  # someone may reuse the buffer: keep a copy
                events = events.copy()
            frames.append(_writer.HEADER.pack(_writer.EVENTS, events.nbytes))
            frames.append(memoryview(events.view(np.uint8)))  # the recorder's bytes, no copy
        self._send(frames)

    def append_from_recorder(self, profiler: Any, start_seq: int, end_seq: int,
                             delta: TraceDelta) -> None:
        """Like ``append``, for the events [start_seq, end_seq) still in ``profiler``:
        they go from the recorder into the pipe as column chunks without
        becoming Python objects (``delta`` gives the side records; its
        events, there when a publisher needed them as rows, are ignored).
        Called by the profiler's pump; blocks while the pipe is full, which
        leaves the events waiting in the recorder, not in memory of ours.
        """
        if self.closed or self.write_error is not None:
            return
        side = self._side_frame(delta)
        try:
            while True:
                # Frames queued before go first: wait (without the pipe lock,
                # which the sender needs) until all are written, then check
                # again under the lock, which keeps the sender out.
                with self._cond:
                    self._cond.wait_for(lambda: self._sent >= self._queued or self._dead
                                        or self._closing)
                with self._pipe_lock:
                    with self._cond:
                        if self._dead or self._closing or not self._fd_open:
                            return
                        if self._sent < self._queued:
                            continue  # one was queued meanwhile
                    if side is not None:  # before the events that use it
                        _write_all(self._data_fd, side)
                    profiler.write_event_columns(self._data_fd, start_seq, end_seq,
                                                 _writer.COLUMNS)
                    return
        except OSError:  # EPIPE: the writer is gone; _reply_loop reports it
            self._pipe_gone()

    def _side_frame(self, delta: TraceDelta) -> bytes | None:
        """The SIDE frame of ``delta``'s side records (None when it has none)."""
        side = _side_payload(delta, self._n_types)
        self._n_types = max(self._n_types, len(delta.type_names))
        return None if side is None else _frame(_writer.SIDE, side)

    def _pipe_gone(self) -> None:
        with self._cond:
            self._outbox.clear()
            self._dead = True
            self._cond.notify_all()

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Blocks until everything appended so far is committed; False on timeout."""
        with self._cond:
            if self._dead or self._closing:
                return True
            self._token += 1
            token = self._token
            self._outbox.append(_frame(_writer.FLUSH, _writer.TOKEN.pack(token)))
            self._queued += 1
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._acked >= token or self._dead, timeout)

    def read_events(self, *, before_seq: int | None = None, start_step: int | None = None,
                    end_step: int | None = None, since_ns: int | None = None) -> np.ndarray:
        """Committed events matching the filters, by seq (after a flush)."""
        self.flush()
        with self._read_lock:
            return _event_reads.query_events(self._reader_con(), before_seq=before_seq,
                                       start_step=start_step, end_step=end_step,
                                       since_ns=since_ns)

    def read_side_records(self, kind: str, start: int, end: int) -> Any:
        """Committed side records with index in [start, end) (after a flush):
        ``"marks"`` as a MARK_DTYPE array (torchmem._contexts), ``"gc"`` a list
        of GCRecords, ``"snapshots"`` of Snapshots. The profiler reads back
        with it what it released from memory once stored."""
        self.flush()
        with self._read_lock:
            return schema.read_side_records(self._reader_con(), kind, start, end)

    def read_trace(self) -> TraceDelta:
        """Everything committed, as one TraceDelta (after a flush)."""
        self.flush()
        with self._read_lock:
            return schema.read_delta(self._reader_con())

    def close(self, wait: bool | None = None) -> None:
        """Stores what is queued and ends the writer; returns once it is all committed.

        The writer then expands the remaining event chunks into ``events``
        rows and checkpoints the WAL. ``wait=True`` waits for that (the file
        is then final), ``wait=False`` does not (the child finishes on its
        own, after this process has exited if need be); None (the default)
        waits only when at most CLOSE_WAIT_BACKLOG events are left. The
        writer is killed if it has not committed within CLOSE_TIMEOUT_S.
        """
        if self.closed:
            if wait:
                self.wait()
            return
        self.closed = True
        _live.discard(self)
        with self._read_lock:
            # Before the writer's last step, which needs the only connection.
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._cond:
            self._closing = True
            if not self._dead:
                self._outbox.append(_frame(_writer.CLOSE, b""))
            self._outbox.append(None)  # the sender closes the pipe after it
            self._cond.notify_all()
            done = self._cond.wait_for(lambda: self._closed_ack or self._dead, CLOSE_TIMEOUT_S)
        if not done:
            self._fail("the writer did not finish in time; the trace ends at its last commit")
        if wait is None:
            wait = self._close_backlog <= CLOSE_WAIT_BACKLOG
        self._stop_io(kill=not done, wait=wait)
        if self._thread is None:
            self._unlock()  # the child holds its own copy until it exits

    def wait(self, timeout: float | None = None) -> bool:
        """After ``close``: blocks until the writer has expanded every event and exited."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                return False
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            return not self._thread.is_alive()
        return True

    # -- internals ---------------------------------------------------------------
    def _send(self, frames: list) -> None:
        with self._cond:
            if self._dead or self._closing:
                return
            self._outbox.extend(frames)
            self._queued += len(frames)
            self._cond.notify_all()

    def _wait_sent(self, timeout: float | None = 30.0) -> bool:
        """Blocks until every appended frame is in the pipe (not yet committed)."""
        with self._cond:
            target = self._queued
            return self._cond.wait_for(lambda: self._sent >= target or self._dead, timeout)

    def _send_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._outbox)
                item = self._outbox.popleft()
            if item is None:
                break
            try:
                with self._pipe_lock:
                    _write_all(self._data_fd, item)
                with self._cond:
                    self._sent += 1
                    self._cond.notify_all()
            except OSError:  # EPIPE: the writer is gone; _reply_loop reports it
                self._pipe_gone()
                break
        with self._pipe_lock:  # never while a direct write is under way
            self._fd_open = False
            try:
                os.close(self._data_fd)  # EOF for the writer
            except OSError:
                pass

    def _reply_loop(self) -> None:
        with os.fdopen(self._reply_fd, "rb") as replies:
            for line in replies:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if msg.get("error"):
                    self._fail(msg["error"])
                if msg.get("warning"):
                    self._warn(f"torchmem: the trace {self.path}: {msg['warning']}")
                with self._cond:
                    self.events_written = int(msg.get("written", self.events_written))
                    if "ready" in msg:
                        self._ready = True
                    if "ack" in msg:
                        self._acked = max(self._acked, int(msg["ack"]))
                    if "closed" in msg:
                        self._closed_ack = True
                        self._close_backlog = int(msg.get("backlog") or 0)
                    self._cond.notify_all()
        with self._cond:
            was_ready, self._dead = self._ready, True
            self._cond.notify_all()
        if was_ready and not self._closed_ack:
            code = None
            if self._proc is not None:
                try:
                    code = self._proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            self._fail("the writer process exited unexpectedly"
                       + (f" (exit code {code})" if code is not None else ""))

    def _stop_io(self, kill: bool, wait: bool = True) -> None:
        """Ends the pipes and threads, and reaps the writer process (``wait``: now,
        else from a daemon thread once it has finished expanding)."""
        with self._cond:
            if not self._outbox or self._outbox[-1] is not None:
                self._outbox.append(None)
            self._cond.notify_all()
        if self._proc is not None:
            if kill:
                self._proc.kill()
            if not (wait or kill):
                self._sender.join(timeout=10)
                threading.Thread(target=self._proc.wait, name="torchmem-sqlite-reap",
                                 daemon=True).start()
                return  # the reply pipe stays open until the child exits
            try:
                self._proc.wait(timeout=CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._sender.join(timeout=10)
        if self._thread is not None:
            if not wait:
                return  # a daemon thread: what it has not expanded stays in chunks
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
        self._replies.join(timeout=10)

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def abandon(self, reason: str) -> None:
        """Stops storing (the pump's watchdog calls it when the writer has stalled):
        one warning naming the trace and ``reason``; the writer process is killed,
        which ends a pipe write waiting on it. The file keeps every event committed
        before, as after a crash; profiling goes on in memory."""
        self._fail(f"given up: {reason}")
        self._pipe_gone()
        if self._proc is not None:
            try:
                self._proc.kill()
            except OSError:
                pass

    def _reader_con(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = _connect(self.path)
        return self._reader

    def _fail(self, reason: str) -> None:
        with self._cond:
            if self.write_error is not None:
                return
            self.write_error = reason
        self._warn(f"torchmem: writing the trace {self.path} failed ({reason}); it holds "
                   f"the events up to the last commit, profiling goes on in memory")

    @staticmethod
    def _warn(message: str) -> None:
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        except Exception:  # warnings turned into errors must not kill a writer thread
            print(message, file=sys.stderr)

    def _forget_after_fork(self) -> None:
        # A forked child (a DataLoader worker) must not hold the pipe open:
        # the writer would never see EOF after the training process dies.
        self.closed = True
        self._dead = True
        for fd in (getattr(self, "_data_fd", None), getattr(self, "_reply_fd", None),
                   getattr(self, "_lock_fd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._proc = None


# Storages not closed by their profiler are closed at exit: the session
# runs close_all after the pumps' final flush (so the trace is complete) and
# before the interpreter dies.
_live: "weakref.WeakSet[SQLiteStorage]" = weakref.WeakSet()


def close_all() -> None:
    """Closes every SQLiteStorage still open (at exit, after the pumps' last flush)."""
    for storage in list(_live):
        try:
            storage.close()
        except Exception:
            pass


def _after_fork_in_child() -> None:
    for storage in list(_live):
        storage._forget_after_fork()
    _live.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
