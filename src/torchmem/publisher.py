"""EventPublisher: MemoryEvents delivered to subscribers in batches, off the hot path.

The profiler's pump calls ``publish_delta`` every flush interval with what
is new. Turning rows into MemoryEvent objects and calling subscribers both
happen on the publisher's own daemon thread, behind a bounded queue: when a
subscriber is too slow the queue fills and new batches are dropped (counted
in ``dropped_batches`` and reported once on stderr) instead of blocking the
caller. A subscriber that raises is reported on stderr and unsubscribed.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
import traceback
from typing import Any, Callable, Iterable

from ._types import MemoryEvent, MemoryEventType

__all__ = ["EventPublisher", "Subscription"]

Callback = Callable[[list[MemoryEvent]], Any]


class Subscription:
    """The handle ``subscribe`` returns; ``unsubscribe()`` or pass it to the publisher's."""

    def __init__(self, publisher: "EventPublisher", sid: int, callback: Callback,
                 kinds: frozenset[int] | None) -> None:
        self._publisher = publisher
        self.id = sid
        self.callback = callback
        self.event_types = kinds
        self.delivered_events = 0

    def unsubscribe(self) -> None:
        """Stops delivery to this subscriber (idempotent)."""
        self._publisher.unsubscribe(self)

    def __repr__(self) -> str:
        return f"<Subscription {self.id} {getattr(self.callback, '__name__', self.callback)!r}>"


class EventPublisher:
    """Delivers every recorded event to subscribed callbacks, in batches.

    Args:
        max_queue_batches: batches waiting for delivery before new ones are
            dropped (each batch is one flush interval of events, 200 ms by
            default).
        max_batch_events: a flush with more events is split into batches of
            at most this many (bounds the memory one batch of objects takes).
    """

    def __init__(self, max_queue_batches: int = 64, max_batch_events: int = 65536) -> None:
        if max_queue_batches < 1 or max_batch_events < 1:
            raise ValueError("max_queue_batches and max_batch_events must be >= 1")
        self.max_queue_batches = int(max_queue_batches)
        self.max_batch_events = int(max_batch_events)
        self._subs: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._busy = False
        self._closed = False
        self.dropped_batches = 0
        self.dropped_events = 0
        self.published_batches = 0
        self._reported_drop = False
        self._thread: threading.Thread | None = None

    # -- subscribers -----------------------------------------------------------
    def subscribe(self, callback: Callback,
                  event_types: Iterable[MemoryEventType] | None = None) -> Subscription:
        """Calls ``callback(list_of_MemoryEvent)`` for every batch, on the publisher thread.

        ``event_types`` limits delivery to those kinds (None: all); a batch
        with none of them is not delivered. Returns a handle for
        ``unsubscribe``.
        """
        if not callable(callback):
            raise TypeError(f"callback must be callable, not {type(callback).__name__}")
        kinds = None if event_types is None else frozenset(
            int(MemoryEventType(t)) for t in event_types)
        with self._cond:
            if self._closed:
                raise RuntimeError("EventPublisher is closed")
            sub = Subscription(self, next(self._ids), callback, kinds)
            self._subs[sub.id] = sub
        return sub

    def unsubscribe(self, handle: Subscription | Callback) -> bool:
        """Removes a subscriber (its handle or its callback); False if it was not subscribed."""
        with self._cond:
            for sid, sub in list(self._subs.items()):
                if sub is handle or sub.callback is handle:
                    del self._subs[sid]
                    return True
        return False

    @property
    def subscribers(self) -> list[Subscription]:
        """The current subscriptions."""
        with self._cond:
            return list(self._subs.values())

    # -- publishing --------------------------------------------------------------
    def publish_delta(self, profiler: Any, delta: Any) -> None:
        """Queues the events of ``delta`` for delivery; never blocks on subscribers.

        The rows are kept as numpy arrays until the publisher thread turns
        them into MemoryEvents (with ``profiler.to_memory_events``).
        """
        events = delta.events
        if not len(events) or self._closed:
            return
        with self._cond:
            if not self._subs:
                return
        for start in range(0, len(events), self.max_batch_events):
            self._enqueue((profiler, events[start:start + self.max_batch_events].copy()))

    def publish(self, events: list[MemoryEvent]) -> None:
        """Queues ready-made MemoryEvents (for sources outside a profiler)."""
        if events and not self._closed:
            self._enqueue((None, list(events)))

    def _enqueue(self, item: tuple) -> None:
        with self._cond:
            if len(self._queue) >= self.max_queue_batches:
                self.dropped_batches += 1
                self.dropped_events += len(item[1])
                report = not self._reported_drop
                self._reported_drop = True
            else:
                self._queue.append(item)
                report = False
                self._ensure_thread()
                self._cond.notify_all()
        if report:
            print(f"torchmem: a subscriber is too slow; dropping event batches "
                  f"(queue of {self.max_queue_batches} full; see dropped_batches)",
                  file=sys.stderr)

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="torchmem-publisher",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return
                profiler, payload = self._queue.popleft()
                self._busy = True
                subs = list(self._subs.values())
            try:
                events = payload if profiler is None else profiler.to_memory_events(payload)
            except Exception as exc:  # a bad batch must not end delivery
                print(f"torchmem: could not convert events for subscribers: {exc!r}",
                      file=sys.stderr)
                continue
            self.published_batches += 1
            for sub in subs:
                self._deliver(sub, events)

    def _deliver(self, sub: Subscription, events: list[MemoryEvent]) -> None:
        if sub.event_types is not None:
            events = [e for e in events if int(e.event_type) in sub.event_types]
            if not events:
                return
        try:
            sub.callback(events)
            sub.delivered_events += len(events)
        except Exception:
            self.unsubscribe(sub)
            print(f"torchmem: subscriber {sub!r} raised and was removed:\n"
                  f"{traceback.format_exc()}", file=sys.stderr)

    # -- lifecycle -----------------------------------------------------------------
    def flush(self, timeout: float | None = 10.0) -> bool:
        """Blocks until every queued batch has been delivered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Delivers what is queued, then stops the thread; later publishes are ignored."""
        self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
