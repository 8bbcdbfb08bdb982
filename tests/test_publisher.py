"""EventPublisher: batched delivery off the caller's thread, drops counted, bad subscribers removed."""

from __future__ import annotations

import threading
import time

import pytest

import torchmem
from torchmem import MemoryEventType
from torchmem.publisher import EventPublisher
from torchmem.trace import TraceDelta


def test_every_event_reaches_subscribers_in_order():
    pub = EventPublisher()
    got, threads = [], set()
    pub.subscribe(lambda batch: (got.extend(batch), threads.add(threading.get_ident())))
    p = torchmem.MemoryProfiler(publisher=pub, auto_snapshot=False, flush_interval_ms=20)
    for i in range(300):
        p.track_allocation(0x1000 + i * 8, 8, "CPU")
        if i % 2:
            p.track_deallocation(0x1000 + i * 8)
    p.close()  # final flush; closes the publisher after delivery
    assert got == p.get_events()
    assert len(got) == 450
    assert threading.get_ident() not in threads


def test_event_type_filter_and_unsubscribe():
    pub = EventPublisher()
    frees, allocs = [], []
    pub.subscribe(frees.extend, event_types=[MemoryEventType.DEALLOCATION])
    handle = pub.subscribe(allocs.extend, event_types=[MemoryEventType.ALLOCATION])
    p = torchmem.MemoryProfiler(publisher=pub, auto_snapshot=False)
    p.track_allocation(0x10, 100)
    p.track_deallocation(0x10)
    p.flush()
    pub.flush()
    handle.unsubscribe()
    p.track_allocation(0x20, 200)
    p.track_deallocation(0x20)
    p.close()
    assert [(e.event_type, e.address, e.size_bytes) for e in frees] == [
        (MemoryEventType.DEALLOCATION, 0x10, 100), (MemoryEventType.DEALLOCATION, 0x20, 200)]
    assert [(e.address, e.size_bytes) for e in allocs] == [(0x10, 100)]


def test_slow_subscriber_never_blocks_and_drops_are_counted(capsys):
    pub = EventPublisher(max_queue_batches=2)
    release = threading.Event()
    calls = []

    def slow(batch):
        calls.append(len(batch))
        release.wait(5)

    pub.subscribe(slow)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    t0 = time.perf_counter()
    cursors: dict = {}
    for i in range(10):
        p.track_allocation(0x1000 + i, 1)
        pub.publish_delta(p.sink_delta(cursors))
        if i == 0:
            while not calls:  # the thread holds batch 0 inside the subscriber
                time.sleep(0.001)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, "publish_delta must not wait for the subscriber"
    assert pub.dropped_batches == 7 and pub.dropped_events == 7  # 1 in delivery, 2 queued
    release.set()
    pub.close()
    assert calls == [1, 1, 1]
    assert "too slow" in capsys.readouterr().err


def test_raising_subscriber_is_reported_and_removed(capsys):
    pub = EventPublisher()
    good = []

    def bad(batch):
        raise RuntimeError("subscriber bug")

    pub.subscribe(bad)
    pub.subscribe(good.extend)
    p = torchmem.MemoryProfiler(publisher=pub, auto_snapshot=False)
    p.track_allocation(0x10, 1)
    p.flush()
    pub.flush()
    p.track_allocation(0x20, 1)
    p.close()
    err = capsys.readouterr().err
    assert err.count("RuntimeError: subscriber bug") == 1 and "removed" in err
    assert len(pub.subscribers) == 1
    assert [e.address for e in good] == [0x10, 0x20]


def test_bad_arguments():
    pub = EventPublisher()
    with pytest.raises(TypeError):
        pub.subscribe(42)
    with pytest.raises(ValueError):
        pub.subscribe(print, event_types=[99])
    with pytest.raises(ValueError):
        EventPublisher(max_queue_batches=0)
    assert pub.unsubscribe(print) is False
    pub.close()
    pub.publish_delta(TraceDelta())  # ignored after close
    with pytest.raises(RuntimeError):
        pub.subscribe(print)


def test_events_are_built_from_the_deltas_alone_without_the_profiler():
    # The publisher keeps what the deltas carry (types, stacks, side records):
    # it converts rows even after the profiler is gone.
    pub = EventPublisher()
    got = []
    pub.subscribe(got.extend)
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    cursors: dict = {}
    p.track_allocation(0x10, 64, "MyType", 2)
    snap = p.track_snapshot()
    p.record_oom(1 << 20, 2, 0, 5, 10)
    deltas = [p.sink_delta(cursors)]
    p.track_deallocation(0x10)
    deltas.append(p.sink_delta(cursors))
    p.close()
    del p
    for d in deltas:
        pub.publish_delta(d)
    assert pub.flush()
    pub.close()
    kinds = [e.event_type for e in got]
    assert kinds == [MemoryEventType.ALLOCATION, MemoryEventType.SNAPSHOT,
                     MemoryEventType.OUT_OF_MEMORY, MemoryEventType.DEALLOCATION]
    assert (got[0].allocation_type, got[0].device, got[0].size_bytes) == ("MyType", 2, 64)
    assert got[0].stack_trace.frames[0][2] == "test_events_are_built_from_the_deltas_alone_without_the_profiler"
    assert got[1].details["snapshot"] == snap
    assert got[2].details["oom"].requested_bytes == 1 << 20


def test_publish_delta_with_a_profiler_is_the_deprecated_form():
    pub = EventPublisher()
    with pytest.warns(DeprecationWarning, match="publish_delta"):
        pub.publish_delta(None, TraceDelta())
    pub.close()
