"""EventPublisher: MemoryEvents delivered to subscribers in batches, off the hot path.

The profiler's pump calls ``publish_delta`` every flush interval with what
is new. The publisher never reads the profiler: each delta carries the type
names, the new stack-table entries and side records, which the publisher
keeps (``_TraceView``) to turn rows into MemoryEvents. That conversion and the
calls to subscribers happen on the publisher's own daemon thread, behind a
bounded queue: when a
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

from ._deprecation import warn_deprecated
from ._events import to_memory_events
from ._stacks import SavedStacks
from ._types import MemoryEvent, MemoryEventType
from .trace import TraceDelta, marker_details

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


class _TraceView:
    """What the deltas so far say: type names, the stack table, side records."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.type_names: list[str] = []
        self.stacks = SavedStacks()
        self.gc_records: list = []
        self.snapshots: list = []
        self.ooms: list = []
        self.contexts: list[tuple[str, str]] = []

    def add(self, d: TraceDelta) -> None:
        with self.lock:
            if len(d.type_names) >= len(self.type_names):
                self.type_names = list(d.type_names)
            if d.frames or len(d.stack_nodes):
                self.stacks.extend(d.frames, d.frames_start, d.stack_nodes, d.nodes_start)
            for records, start, new in ((self.gc_records, d.gc_start, d.gc_records),
                                        (self.snapshots, d.snapshots_start, d.snapshots),
                                        (self.ooms, d.ooms_start, d.ooms),
                                        (self.contexts, d.contexts_start, d.contexts)):
                del records[start:]
                records.extend(new)

    def events(self, rows: Any) -> list[MemoryEvent]:
        with self.lock:
            return to_memory_events(rows, self.type_names, self.stacks.resolve,
                                    lambda kind, i: marker_details(kind, i, self.snapshots,
                                                                   self.gc_records, self.ooms),
                                    self.context)

    def context(self, context_id: int) -> tuple[str, str]:
        c = self.contexts
        return tuple(c[context_id]) if context_id < len(c) else ("", "other")


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
        self._view = _TraceView()

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
    def publish_delta(self, delta: TraceDelta, *old: Any) -> None:
        """Queues the events of ``delta`` for delivery; never blocks on subscribers.

        Every delta the profiler hands over must come here, in order (its
        stack-table entries and side records are kept, even when no one is
        subscribed); the rows stay numpy arrays until the publisher thread
        turns them into MemoryEvents. ``publish_delta(profiler, delta)``, the
        old form, still works for one release (with a DeprecationWarning).
        """
        if old:
            warn_deprecated("EventPublisher.publish_delta(profiler, delta)",
                            "EventPublisher.publish_delta(delta)")
            delta = old[0]
        if self._closed:
            return
        self._view.add(delta)
        events = delta.events
        if not len(events):
            return
        with self._cond:
            if not self._subs:
                return
        for start in range(0, len(events), self.max_batch_events):
            self._enqueue((self._view, events[start:start + self.max_batch_events].copy()))

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
                view, payload = self._queue.popleft()
                self._busy = True
                subs = list(self._subs.values())
            try:
                events = payload if view is None else view.events(payload)
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
