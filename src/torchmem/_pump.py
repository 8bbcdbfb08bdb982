"""The background thread that hands new events to storage and publisher."""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any


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
        if storage is not None:
            meta = getattr(storage, "open", None)
            if meta is not None:
                meta()
        profiler._set_consumer_seq(0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="torchmem-sinks", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def flush(self) -> None:
        """Delivers everything recorded so far (synchronously)."""
        profiler = self._profiler()
        if profiler is None:
            return
        with self._flush_lock:
            delta = profiler._sink_delta(self._cursors)
            if delta.is_empty():
                return
            if self.storage is not None:
                self._deliver("storage", self.storage.append, delta)
            if self.publisher is not None:
                self._deliver("publisher", self.publisher.publish_delta, profiler, delta)
            profiler._set_consumer_seq(self._cursors["seq"])

    def _deliver(self, name: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # a sink must never take the training run down
            if name not in self._failed:
                self._failed.add(name)
                print(f"torchmem: {name} failed: {exc!r}", file=sys.stderr)

    def stop(self) -> None:
        """Final flush, then stops the thread and closes the storage."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)
        self.flush()
        if self.storage is not None and hasattr(self.storage, "close"):
            self._deliver("storage", self.storage.close)
