"""The background thread that hands new events to storage and publisher."""

from __future__ import annotations

import inspect
import os
import platform
import socket
import sys
import threading
import time
import weakref
from typing import Any

from ._version import __version__

# Pumps still running at interpreter exit get a final flush, so a script
# that never calls profiler.close() still leaves a complete trace (the
# session runs stop_all at exit, before the storages close).
_live_pumps: "weakref.WeakSet[SinkPump]" = weakref.WeakSet()


def stop_all() -> None:
    """Final flush and stop of every pump still running (at exit)."""
    for pump in list(_live_pumps):
        try:
            pump.stop()
        except Exception:
            pass


def _devices() -> list[dict[str, Any]]:
    """CUDA devices torch sees, without initialising CUDA when it is not yet."""
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not torch.cuda.is_available():
            return []
        out = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            out.append({"index": i, "name": props.name, "total_memory_bytes": props.total_memory})
        return out
    except Exception:
        return []


def run_metadata(profiler: Any, interval_ms: float) -> dict[str, Any]:
    """What a trace records about its run: versions, host, devices, settings.

    Times are ns since the epoch; ``rank`` / ``world_size`` only when
    torch.distributed is initialised.
    """
    meta: dict[str, Any] = {
        "torchmem_version": __version__,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
        "start_time_ns": time.time_ns(),
        "settings": {
            "capture_stack_traces": bool(profiler.capture_stack_traces),
            "max_stack_trace_depth": int(profiler.max_stack_trace_depth),
            "snapshot_interval_ms": profiler.snapshot_interval_ms,
            "auto_snapshot": bool(profiler.auto_snapshot),
            "flush_interval_ms": interval_ms,
        },
    }
    torch = sys.modules.get("torch")
    if torch is None:
        # Not imported (yet): read the installed version without importing it.
        try:
            from importlib.metadata import version

            meta["torch_version"] = version("torch")
        except Exception:
            meta["torch_version"] = None
    else:
        meta["torch_version"] = str(torch.__version__)
        meta["cuda_version"] = getattr(torch.version, "cuda", None)
        meta["devices"] = _devices()
        try:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                meta["rank"] = dist.get_rank()
                meta["world_size"] = dist.get_world_size()
        except Exception:
            pass
    return meta


class SinkPump:
    """Every ``interval_ms``, reads what is new in the profiler and gives it to the sinks.

    The recorder keeps every event no sink has yet received (it never drops
    unread events from its ring), so nothing is lost between two flushes.
    A sink that raises is reported once on stderr and the others go on.
    """

    def __init__(self, profiler: Any, storage: Any, publisher: Any, interval_ms: float) -> None:
        self._profiler = weakref.ref(profiler)
        self.storage = storage
        self.publisher = publisher
        self.interval_s = max(float(interval_ms), 1.0) / 1000.0
        self._cursors: dict[str, int] = {}
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failed: set[str] = set()
        # Events go from the recorder to a storage that can take them so
        # (SQLiteStorage): no rows built in Python for it, no copy held here.
        # Only a publisher (or another storage) gets them as Python rows.
        # Looked up on the class: a wrapper that forwards every attribute
        # (a tee over two backends) must get plain appends.
        self._direct = getattr(type(storage), "append_from_recorder", None) is not None
        self._rows = publisher is not None or (storage is not None and not self._direct)
        if storage is not None:
            open_ = getattr(storage, "open", None)
            if open_ is not None:
                self._deliver("storage", open_, run_metadata(profiler, interval_ms))
        profiler.set_consumer_seq(0)
        self._consumed = 0  # the consumer seq last set: every sink has the events before it
        self._stopped = False
        _live_pumps.add(self)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="torchmem-sinks", daemon=True)
        self._thread.start()
        if self._direct and hasattr(self.storage, "abandon"):
            threading.Thread(target=self._watch, name="torchmem-sinks-watch",
                             daemon=True).start()

    #: Events the recorder may hold for a storage that takes them from the
    #: recorder (SQLiteStorage) but has stopped taking them (a stalled disk, a
    #: stopped writer): 43 bytes each in the ring, so 4M events are ~180 MB.
    #: Past it, once the storage has taken nothing for ``stall_s`` (or past
    #: four times it whatever the storage does: a writer too slow for the
    #: run), the storage is given up (its trace keeps what it committed),
    #: with one warning, and the ring goes back to its retention.
    max_held_events = 4 << 20
    stall_s = 2.0
    #: How often (seconds) the watchdog looks at what is held.
    watch_s = 0.5

    def _watch(self) -> None:
        """The pump's thread waits in the storage's pipe write while the writer is
        stalled, so another thread bounds what the recorder holds meanwhile."""
        taken, since = self._consumed, time.monotonic()
        while not self._stop.wait(self.watch_s):
            profiler = self._profiler()
            if profiler is None or self.storage is None:
                return
            if self._consumed != taken:
                taken, since = self._consumed, time.monotonic()
            held = profiler.next_seq - self._consumed
            stalled = time.monotonic() - since >= self.stall_s
            if held > self.max_held_events and (stalled or held > 4 * self.max_held_events):
                self._deliver("storage", self.storage.abandon,
                              f"the writer has taken no events for "
                              f"{time.monotonic() - since:.0f} s while {held:,} events "
                              f"({held * 43 / 1e6:.0f} MB) waited for it in memory, past "
                              f"the bound of {self.max_held_events:,}")
                return

    #: Hand over early once this many events are pending: the recorder's rows
    #: are copied out under the GIL, and one large read costs ~5x more per
    #: event than reads of <= 64K events (page faults and cache misses on a
    #: fresh multi-MB buffer: ~130 vs ~25 ns/event measured on 2 cores).
    batch_events = 1 << 16
    #: The same when no sink needs rows (events go to storage straight from
    #: the recorder, no buffer to fill): the pipe writes cost ~40% less CPU
    #: per event in hand-overs of 256K events than of 64K (flat out: 21 vs 12 ns).
    direct_batch_events = 1 << 18
    #: How often (seconds) the pump looks at the pending count between hand-overs.
    poll_s = 0.01

    def _run(self) -> None:
        due = time.monotonic() + self.interval_s
        batch = self.batch_events if self._rows else self.direct_batch_events
        while not self._stop.wait(max(0.0, min(self.poll_s, due - time.monotonic()))):
            if time.monotonic() >= due or self._pending() >= batch:
                self.flush()
                due = time.monotonic() + self.interval_s

    def _pending(self) -> int:
        """Events recorded but not yet handed over (a cheap native read)."""
        profiler = self._profiler()
        if profiler is None:
            return 0
        return profiler.next_seq - self._cursors.get("seq", 0)

    #: Seconds ``flush(commit=True)`` waits for the storage to commit.
    commit_timeout_s = 60.0

    def flush(self, commit: bool = False) -> None:
        """Delivers everything recorded so far (synchronously); with ``commit``,
        also waits until the storage has stored it (``storage.flush()``)."""
        self._hand_over()
        if commit and self.storage is not None and hasattr(self.storage, "flush"):
            self._commit()

    def _commit(self) -> None:
        flush = self.storage.flush
        try:
            takes_timeout = "timeout" in inspect.signature(flush).parameters
        except (TypeError, ValueError):
            takes_timeout = False
        try:
            done = flush(timeout=self.commit_timeout_s) if takes_timeout else flush()
        except Exception as exc:
            done = False
            why = repr(exc)
        else:
            why = f"not stored within {self.commit_timeout_s:.0f} s"
        if done is False and "commit" not in self._failed:
            self._failed.add("commit")
            where = getattr(self.storage, "path", None) or type(self.storage).__name__
            print(f"torchmem: flush: the events recorded so far are not all committed to "
                  f"{where} ({why}); they stay in memory", file=sys.stderr)

    def _hand_over(self) -> None:
        profiler = self._profiler()
        if profiler is None:
            return
        with self._flush_lock:
            start = self._cursors.get("seq", 0)
            delta = profiler.sink_delta(self._cursors, with_events=self._rows)
            end = self._cursors["seq"]
            if delta.is_empty() and end == start:
                return
            # The publisher first: its queue never blocks, while storage
            # waits while its pipe is full (so a stalled disk delays the
            # next hand-over to subscribers, not this one).
            if self.publisher is not None:
                self._deliver("publisher", self.publisher.publish_delta, delta)
            stored = False
            if self._direct:
                stored = self._deliver("storage", self.storage.append_from_recorder, profiler,
                                       start, end, delta)
            elif self.storage is not None:
                stored = self._deliver("storage", self.storage.append, delta)
            # The side records handed over may leave memory, as the events
            # before the consumer seq leave the ring; not once the storage
            # has failed (it ignores appends then).
            if stored and getattr(self.storage, "write_error", None) is None:
                profiler.release_stored(self._cursors)
            profiler.set_consumer_seq(self._cursors["seq"])
            self._consumed = self._cursors["seq"]

    def _deliver(self, name: str, fn: Any, *args: Any) -> bool:
        """Calls ``fn(*args)``; False when it raised (reported once)."""
        try:
            fn(*args)
        except Exception as exc:  # a sink must never take the training run down
            if name not in self._failed:
                self._failed.add(name)
                print(f"torchmem: {name} failed: {exc!r}", file=sys.stderr)
            return False
        return True

    def stop(self) -> None:
        """Final flush, then stops the thread and closes the storage and publisher."""
        if self._stopped:
            return
        self._stopped = True
        _live_pumps.discard(self)
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.flush()
        if self.storage is not None and hasattr(self.storage, "close"):
            self._deliver("storage", self.storage.close)
        if self.publisher is not None and hasattr(self.publisher, "close"):
            self._deliver("publisher", self.publisher.close)
