"""Timed snapshots: a daemon thread that calls ``profiler.track_snapshot()``.

The thread holds the profiler and its ``AutoSnapshotter`` only through weak
references between ticks, so neither is kept alive by it: when either is
garbage the thread ends at its next tick (the snapshotter's death also wakes
it at once). All snapshotters still running are stopped from an ``atexit``
hook, before interpreter teardown, so no snapshot runs against a half-torn-down
interpreter.
"""

from __future__ import annotations

import atexit
import threading
import time
import weakref
from typing import Any

from ._checks import check_interval_ms

__all__ = ["AutoSnapshotter"]

_running: weakref.WeakSet[AutoSnapshotter] = weakref.WeakSet()

#: How long stop() waits for a snapshot in progress, in seconds.
JOIN_TIMEOUT_S = 10.0


def _tick_loop(sref: weakref.ref, pref: weakref.ref, stop: threading.Event) -> None:
    next_t = time.monotonic()
    while True:
        me = sref()
        if me is None:
            return
        interval_s = max(me.interval_ms, 1) / 1000.0
        del me
        # A fixed schedule (no drift from the snapshot's own duration); after
        # a stall, resume from now instead of firing a burst to catch up.
        next_t += interval_s
        now = time.monotonic()
        if next_t < now:
            next_t = now
        if stop.wait(next_t - now):
            return
        prof, me = pref(), sref()
        if prof is None or me is None or stop.is_set():
            return
        try:
            if prof.is_enabled:
                prof.track_snapshot()
                me.count += 1
        except Exception as exc:  # a snapshot must never kill the thread
            me.errors += 1
            me.last_error = exc
        del prof, me


class AutoSnapshotter:
    """Calls ``profiler.track_snapshot()`` every ``interval_ms`` milliseconds.

    Snapshots are taken only while ``profiler.is_enabled``; the first comes
    one interval after ``start()``. ``interval_ms`` may be changed while
    running (it applies from the next tick). ``count`` is the number of
    snapshots taken, ``errors`` / ``last_error`` the failures swallowed.
    """

    def __init__(self, profiler: Any, interval_ms: int | float) -> None:
        self._interval_ms = check_interval_ms(interval_ms, "interval_ms")
        self._profiler = weakref.ref(profiler)
        self.count = 0
        self.errors = 0
        self.last_error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def interval_ms(self) -> int | float:
        """Milliseconds between snapshots: finite, > 0, at most a day (a nan made
        the thread spin, inf killed it)."""
        return self._interval_ms

    @interval_ms.setter
    def interval_ms(self, ms: int | float) -> None:
        self._interval_ms = check_interval_ms(ms, "interval_ms")

    @property
    def running(self) -> bool:
        """True while the thread is alive."""
        t = self._thread
        return t is not None and t.is_alive()

    def start(self) -> AutoSnapshotter:
        """Start the thread (no-op if it runs); a stopped snapshotter may be restarted."""
        with self._lock:
            if self.running:
                return self
            stop = threading.Event()
            self._stop = stop
            t = threading.Thread(
                target=_tick_loop,
                args=(weakref.ref(self, lambda _r, e=stop: e.set()), self._profiler, stop),
                name="torchmem-snapshots",
                daemon=True,
            )
            self._thread = t
            _running.add(self)
            t.start()
        return self

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread and wait for it (up to ``timeout`` s, default JOIN_TIMEOUT_S).

        Returns True when the thread has ended. Safe to call from the thread
        itself (it then just asks it to end) and more than once. Do not call
        it while holding a lock that ``track_snapshot()`` takes: a snapshot in
        progress would wait for it and the join would time out.
        """
        with self._lock:
            t, self._thread = self._thread, None
            self._stop.set()
            _running.discard(self)
        if t is None or t is threading.current_thread():
            return True
        t.join(JOIN_TIMEOUT_S if timeout is None else timeout)
        return not t.is_alive()

    def __enter__(self) -> AutoSnapshotter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for s in list(_running):
        s.stop(timeout=1.0)
