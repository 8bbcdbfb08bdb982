"""Garbage-collection monitoring: every collection of the program, as GC events and records.

``GCMonitor`` hangs one callback on ``gc.callbacks``; for every collection it
calls the profiler's ``record_gc_start(generation)`` and
``record_gc_end(generation, collected, uncollectable)``, which record
GC_START / GC_END events and a ``GCRecord``. Tensor storages whose last
reference sat in a reference cycle die inside the collection (their weakref
callbacks run between the two phases), so the record's
``tensor_bytes_freed`` is the bytes that collection released.

The GC problems worth telling a user about (``find_gc_problems``) are
analysis: ``torchmem.analysis.gc_problems``. Their old names here still work
for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

from .._deprecation import moved_names

__all__ = ["GCMonitor", "collect_unreported"]

# Set while torchmem itself runs a collection (collect_unreported).
_own_collection = threading.local()


def collect_unreported(generation: int = 2) -> int:
    """``gc.collect(generation)`` run by torchmem itself (the epoch check, the pytest
    plugin): monitors do not record it, so it never shows as a pause of the
    program's (a full collection with torch loaded takes ~100+ ms). Tensors it
    frees are still recorded as deallocations. Returns what gc.collect returns.
    """
    _own_collection.active = True
    try:
        return gc.collect(generation)
    finally:
        _own_collection.active = False


class GCMonitor:
    """Reports every garbage collection to ``profiler``.

    ``start()`` / ``stop()`` are idempotent; ``stop()`` removes the callback
    from ``gc.callbacks``. Collections that start while the profiler is
    disabled are not reported. The monitor holds the profiler weakly: a profiler
    that is garbage makes the callback a no-op, and the monitor removes itself
    when the profiler dies.
    """

    def __init__(self, profiler: Any) -> None:
        self._profiler = weakref.ref(profiler)
        self._lock = threading.RLock()  # stop() may run from a finalizer inside GC
        self._callback = None
        self.errors = 0  # exceptions swallowed in the callback (it must never raise)
        self._finalizer = weakref.finalize(profiler, self.stop)
        self._finalizer.atexit = False

    @property
    def active(self) -> bool:
        """True while the callback is installed."""
        return self._callback is not None

    def start(self) -> GCMonitor:
        """Install the gc.callbacks hook."""
        with self._lock:
            if self._callback is None:
                self._callback = self._make_callback()
                gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        """Remove the gc.callbacks hook; a collection in progress is not reported."""
        with self._lock:
            cb, self._callback = self._callback, None
            if cb is not None:
                try:
                    gc.callbacks.remove(cb)
                except ValueError:
                    pass

    def __enter__(self) -> GCMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_callback(self):
        pref = self._profiler
        monitor = weakref.ref(self)

        # A closure, not a bound method: gc.callbacks then does not keep the
        # monitor alive, and identity-based removal is exact.
        # Collections never nest, so one slot says whether the collection in
        # progress was reported as started (a profiler disabled at its start
        # gets neither event; one disabled midway still gets the end).
        started = [False]

        def on_gc(phase: str, info: dict) -> None:
            prof = pref()
            if prof is None:
                return
            try:
                if phase == "start":
                    started[0] = (bool(prof.is_enabled)
                                  and not getattr(_own_collection, "active", False))
                    if started[0]:
                        prof.record_gc_start(info["generation"])
                elif started[0]:
                    started[0] = False
                    prof.record_gc_end(info["generation"], info["collected"],
                                        info["uncollectable"])
            except Exception:
                m = monitor()
                if m is not None:
                    m.errors += 1

        return on_gc


# The one upward reference in the layers, resolved only when an old name is
# read (import-linter sees no import): the aliases go with the release after.
__getattr__ = moved_names(__name__, {
    name: f"torchmem.analysis.gc_problems:{name}"
    for name in ("GCProblem", "find_gc_problems", "DEFAULT_GEN2_PER_MINUTE",
                 "DEFAULT_LONG_PAUSE_MS", "DEFAULT_TIME_SHARE", "DEFAULT_WINDOW_S")})
