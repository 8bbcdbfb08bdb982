"""EventPublisher: MemoryEvents delivered to subscribers in batches, off the hot path.

The profiler's pump calls ``publish_delta`` every flush interval with what
is new. The publisher never reads the profiler: each delta carries the type
names, the new stack-table entries and side records, which the publisher
keeps (``_TraceView``) to turn rows into MemoryEvents. That conversion and the
calls to subscribers happen off the caller's thread: each subscriber has its
own daemon thread behind its own bounded queue (a batch is converted once,
by the first of them to need it), so a subscriber that never returns holds
up only itself. When a subscriber is too slow its queue fills and new
batches are dropped for it (counted in ``dropped_batches`` and reported
once on stderr) instead of blocking the caller. A subscriber that raises is
reported on stderr and unsubscribed. ``close`` waits for the queues once,
for at most its timeout, and names each subscriber that did not return.
"""

from __future__ import annotations

import collections
import itertools
import sys
import threading
import time
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
        self.dropped_batches = 0
        self._queue: collections.deque = collections.deque()
        self._thread: threading.Thread | None = None
        self._busy = False  # inside the callback (or converting its batch)
        self._reported_drop = False

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


class _Batch:
    """One batch for every subscriber: rows (with the view that resolves them) or
    ready-made events; converted once, by the first subscriber thread to need it."""

    __slots__ = ("view", "payload", "_events", "_lock")

    def __init__(self, view: _TraceView | None, payload: Any) -> None:
        self.view, self.payload = view, payload
        self._events: list[MemoryEvent] | None = None
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.payload)

    def events(self) -> tuple[list[MemoryEvent], bool]:
        """The events, and whether this call converted them."""
        with self._lock:
            if self._events is not None:
                return self._events, False
            self._events = (self.payload if self.view is None
                            else self.view.events(self.payload))
            self.payload = self.payload if self.view is None else None
            return self._events, True


class EventPublisher:
    """Delivers every recorded event to subscribed callbacks, in batches.

    Args:
        max_queue_batches: batches waiting for delivery to one subscriber
            before new ones are dropped for it (each batch is one flush
            interval of events, 200 ms by default).
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
        self._closed = False
        #: Batches (and their events) dropped, once for each subscriber that missed them.
        self.dropped_batches = 0
        self.dropped_events = 0
        self.published_batches = 0  # batches turned into MemoryEvents
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
            self._enqueue(_Batch(self._view, events[start:start + self.max_batch_events].copy()))

    def publish(self, events: list[MemoryEvent]) -> None:
        """Queues ready-made MemoryEvents (for sources outside a profiler)."""
        if events and not self._closed:
            self._enqueue(_Batch(None, list(events)))

    def _enqueue(self, batch: _Batch) -> None:
        too_slow = []
        with self._cond:
            for sub in self._subs.values():
                if len(sub._queue) >= self.max_queue_batches:
                    sub.dropped_batches += 1
                    self.dropped_batches += 1
                    self.dropped_events += len(batch)
                    if not sub._reported_drop:
                        sub._reported_drop = True
                        too_slow.append(sub)
                    continue
                sub._queue.append(batch)
                if sub._thread is None:
                    sub._thread = threading.Thread(target=self._run, args=(sub,), daemon=True,
                                                   name=f"torchmem-subscriber-{sub.id}")
                    sub._thread.start()
            self._cond.notify_all()
        for sub in too_slow:
            print(f"torchmem: subscriber {sub!r} is too slow; dropping event batches for it "
                  f"(queue of {self.max_queue_batches} full; see dropped_batches)",
                  file=sys.stderr)

    def _run(self, sub: Subscription) -> None:
        """One subscriber's delivery thread."""
        while True:
            with self._cond:
                sub._busy = False
                self._cond.notify_all()
                self._cond.wait_for(lambda: sub._queue or self._closed
                                    or sub.id not in self._subs)
                if not sub._queue or sub.id not in self._subs:
                    sub._queue.clear()
                    sub._thread = None
                    self._cond.notify_all()
                    return
                batch = sub._queue.popleft()
                sub._busy = True
            try:
                events, converted = batch.events()
            except Exception as exc:  # a bad batch must not end delivery
                print(f"torchmem: could not convert events for subscribers: {exc!r}",
                      file=sys.stderr)
                continue
            if converted:
                with self._cond:
                    self.published_batches += 1
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
            # Report before unsubscribing: once it is out of _subs, flush() and
            # close() no longer wait for this thread, and the message could land
            # after the caller has moved on.
            print(f"torchmem: subscriber {sub!r} raised and was removed:\n"
                  f"{traceback.format_exc()}", file=sys.stderr)
            self.unsubscribe(sub)

    # -- lifecycle -----------------------------------------------------------------
    def _pending(self) -> list[Subscription]:
        """Subscribers with batches queued or in delivery (under ``_cond``)."""
        return [s for s in self._subs.values() if s._queue or s._busy]

    def flush(self, timeout: float | None = 10.0) -> bool:
        """Blocks until every queued batch has been delivered; False on timeout."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._pending(), timeout)

    def close(self, timeout: float | None = 10.0) -> None:
        """Delivers what is queued (waiting at most ``timeout`` seconds in all), then
        stops the threads; later publishes are ignored. A subscriber that has not
        returned by then is named on stderr and not waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush(timeout)
        with self._cond:
            stuck = [(s, len(s._queue) + s._busy) for s in self._pending()]
            threads = [s._thread for s in self._subs.values() if s._thread is not None]
            self._closed = True
            self._cond.notify_all()
        for sub, n in stuck:
            print(f"torchmem: subscriber {sub!r} did not return within {timeout:g} s; "
                  f"{n} batch(es) not delivered to it, and exit does not wait for it",
                  file=sys.stderr)
        stuck_threads = {s._thread for s, _ in stuck}
        for t in threads:
            if t in stuck_threads or t is threading.current_thread():
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
