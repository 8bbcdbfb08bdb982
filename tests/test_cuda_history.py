"""The CUDA history source against recorded fake snapshots of torch's
``_snapshot()``: nothing read twice, nothing missed, OOM observer."""

from __future__ import annotations

import threading

import pytest

import torchmem
from torchmem.sources.cuda_history import CudaHistorySource, TraceCursor


def alloc(addr, size, t, stream=0, frames=None):
    e = {"action": "alloc", "addr": addr, "size": size, "stream": stream, "time_us": t}
    if frames is not None:
        e["frames"] = frames
    return e


def free_req(addr, size, t):
    return {"action": "free_requested", "addr": addr, "size": size, "stream": 0, "time_us": t}


def free_done(addr, size, t):
    return {"action": "free_completed", "addr": addr, "size": size, "stream": 0, "time_us": t}


class FakeTorch:
    """Plays torch: a growing trace per device, optionally a bounded ring."""

    def __init__(self, devices=1, ring=None, segments=None):
        self.traces = [[] for _ in range(devices)]
        self.ring = ring
        self.segments = segments or []
        self.history_calls = []
        self.observers = []

    def add(self, device, *entries):
        trace = self.traces[device]
        trace.extend(entries)
        if self.ring is not None and len(trace) > self.ring:
            del trace[: len(trace) - self.ring]

    def snapshot(self):
        return {"segments": self.segments, "device_traces": [list(t) for t in self.traces]}

    def record_history(self, enabled, max_entries, stacks):
        self.history_calls.append((enabled, max_entries, stacks))

    def attach(self, fn):
        self.observers.append(fn)


class Sink:
    """Records what the source feeds, in order."""

    def __init__(self):
        self.calls = []

    def track_allocation(self, addr, size, kind, device, stream):
        self.calls.append(("alloc", addr, size, kind, device, stream))

    def track_deallocation(self, addr, size=None):
        self.calls.append(("free", addr, size))

    def record_oom(self, requested, device, stream, device_free, device_total):
        self.calls.append(("oom", requested, device, stream, device_free, device_total))


def make(sink, fake, **kw):
    kw.setdefault("interval_s", 0)
    return CudaHistorySource(sink, snapshot_fn=fake.snapshot, record_history_fn=fake.record_history,
                             attach_oom_fn=fake.attach, current_stream_fn=lambda d: 11, **kw)


def test_entries_are_read_once_across_polls():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake).start()
    fake.add(0, alloc(0x1000, 512, 10, stream=7), alloc(0x2000, 1024, 10))
    assert src.poll() == 2
    assert src.poll() == 0
    fake.add(0, free_req(0x1000, 512, 11), free_done(0x1000, 512, 12), alloc(0x3000, 64, 12))
    assert src.poll() == 2
    assert sink.calls == [
        ("alloc", 0x1000, 512, "GPU", 0, 7),
        ("alloc", 0x2000, 1024, "GPU", 0, 0),
        ("free", 0x1000, 512),
        ("alloc", 0x3000, 64, "GPU", 0, 0),
    ]
    assert src.live_bytes == 1024 + 64


def test_same_microsecond_entries_split_across_polls():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake).start()
    fake.add(0, alloc(0x1000, 1, 5), alloc(0x2000, 2, 5))
    src.poll()
    fake.add(0, alloc(0x3000, 3, 5), alloc(0x4000, 4, 6))
    src.poll()
    assert [c[1] for c in sink.calls] == [0x1000, 0x2000, 0x3000, 0x4000]


def test_ring_that_drops_old_entries_is_read_once():
    fake, sink = FakeTorch(ring=3), Sink()
    src = make(sink, fake, max_entries=3).start()
    fake.add(0, alloc(0x1, 8, 1), alloc(0x2, 8, 2), alloc(0x3, 8, 3))
    src.poll()
    fake.add(0, free_done(0x1, 8, 4), free_done(0x2, 8, 5))  # ring keeps 3, 4, 5
    src.poll()
    assert sink.calls == [("alloc", 0x1, 8, "GPU", 0, 0), ("alloc", 0x2, 8, "GPU", 0, 0),
                          ("alloc", 0x3, 8, "GPU", 0, 0), ("free", 0x1, 8), ("free", 0x2, 8)]
    assert src.lost_entries == 0
    fake.add(0, alloc(0x4, 8, 6), alloc(0x5, 8, 7), alloc(0x6, 8, 8), alloc(0x7, 8, 9))
    src.poll()  # entry at t=6 left the ring unread
    assert [c[1] for c in sink.calls[5:]] == [0x5, 0x6, 0x7]
    assert src.lost_entries == 1


def test_positional_cursor_without_timestamps():
    cur = TraceCursor()
    trace = [{"action": "alloc", "addr": 1, "size": 1}]
    assert cur.take(trace) == trace
    trace.append({"action": "alloc", "addr": 2, "size": 1})
    assert cur.take(trace) == trace[1:]
    assert cur.take([]) == []
    assert cur.take(trace[:1]) == trace[:1]  # cleared and started again


def test_devices_have_their_own_cursors():
    fake, sink = FakeTorch(devices=2), Sink()
    src = make(sink, fake).start()
    fake.add(1, alloc(0xB000, 100, 50))
    fake.add(0, alloc(0xA000, 200, 99))
    src.poll()
    fake.add(1, free_done(0xB000, 100, 60))  # older than device 0's newest entry
    src.poll()
    assert sink.calls == [("alloc", 0xA000, 200, "GPU", 0, 0), ("alloc", 0xB000, 100, "GPU", 1, 0),
                          ("free", 0xB000, 100)]


def test_baseline_takes_live_blocks_and_skips_old_history():
    segments = [{"device": 0, "stream": 3, "blocks": [
        {"address": 0x100, "size": 512, "requested_size": 500, "state": "active_allocated"},
        {"address": 0x300, "size": 512, "state": "inactive"},
    ]}]
    fake, sink = FakeTorch(segments=segments), Sink()
    fake.add(0, alloc(0x100, 512, 1), alloc(0x200, 64, 2), free_done(0x200, 64, 3))
    src = make(sink, fake).start()
    assert sink.calls == [("alloc", 0x100, 500, "GPU", 0, 3)]  # requested, like the trace
    assert src.poll() == 0
    fake.add(0, free_done(0x100, 512, 4), free_done(0x999, 8, 4))  # 0x999: before our time
    src.poll()
    assert sink.calls[1:] == [("free", 0x100, 500)]
    assert fake.history_calls == [(True, 200_000, False)]


def test_frames_are_kept_per_live_block():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake).start()
    frames = [{"filename": "train.py", "line": 12, "name": "step"},
              {"filename": "train.py", "line": 30, "name": "main"}]
    fake.add(0, alloc(0x1000, 8, 1, frames=frames))
    src.poll()
    assert src.frames_for(0x1000) == (("train.py", 12, "step"), ("train.py", 30, "main"))
    fake.add(0, free_done(0x1000, 8, 2))
    src.poll()
    assert src.frames_for(0x1000) is None


def test_oom_observer_records_once():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake).start()
    import torchmem.sources.cuda_history as ch
    if not fake.observers:  # the process-wide observer was attached by an earlier source
        ch._dispatch_oom(0, 2 << 30, 80 << 30, 1 << 30)
    else:
        fake.observers[0](0, 2 << 30, 80 << 30, 1 << 30)
    fake.add(0, {"action": "oom", "size": 2 << 30, "device_free": 1 << 30, "stream": 0,
                 "time_us": 9})
    src.poll()  # the trace's oom entry is not recorded a second time
    assert sink.calls == [("oom", 2 << 30, 0, 11, 1 << 30, 80 << 30)]
    src.stop()


def test_stop_reads_the_rest_and_turns_history_off():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake).start()
    fake.add(0, alloc(0x1, 16, 1))
    src.stop()
    assert sink.calls == [("alloc", 0x1, 16, "GPU", 0, 0)]
    assert fake.history_calls == [(True, 200_000, False), (False, 200_000, False)]


def test_background_poller_and_poll_waits_for_it():
    fake, sink = FakeTorch(), Sink()
    src = make(sink, fake, interval_s=30.0).start()
    fake.add(0, alloc(0x1, 16, 1))
    assert src.poll() == 1  # done by the poller thread, this call waits
    assert src._thread_ident not in (None, threading.get_ident())
    fake.add(0, alloc(0x2, 16, 2))
    src.stop()
    assert [c[1] for c in sink.calls] == [0x1, 0x2]


def test_into_a_real_profiler_exact_counters():
    prof = torchmem.MemoryProfiler(auto_snapshot=False)
    fake = FakeTorch()
    src = make(prof, fake).start()
    fake.add(0, alloc(0x1000, 512, 1, stream=5), alloc(0x2000, 2048, 2),
             free_req(0x1000, 512, 3), free_done(0x1000, 512, 4), alloc(0x3000, 1024, 5))
    src.poll()
    s = prof.get_statistics_for_type("GPU")
    assert (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes,
            s.peak_usage_bytes, s.allocation_count, s.deallocation_count) == (
        3584, 512, 3072, 3072, 3, 1)
    ev = prof.get_events()[0]
    assert (ev.address, ev.size_bytes, ev.device, ev.stream, ev.allocation_type) == (
        0x1000, 512, 0, 5, "GPU")
    assert prof.anomalies["total"] == 0
    src.stop()
    prof.close()
