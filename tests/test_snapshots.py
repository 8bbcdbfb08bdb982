"""Timed snapshots: cadence, stop on disable, exact counters, clean shutdown."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

from torchmem import MemoryEventType, MemoryProfiler
from torchmem import _snapshots as snapshots
from torchmem._snapshots import AutoSnapshotter


def wait_for(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.005)
    return False


class CountingProfiler:
    def __init__(self, fail=False):
        self.is_enabled = True
        self.calls = []
        self.fail = fail

    def track_snapshot(self):
        self.calls.append(time.monotonic())
        if self.fail:
            raise RuntimeError("boom")


def test_profiler_snapshots_every_interval():
    p = MemoryProfiler(snapshot_interval_ms=50)
    try:
        time.sleep(0.525)
        n = len(p.snapshots)
        # 10 ticks are due; a loaded 2-core CI box may lose a couple
        assert 7 <= n <= 11, n
        ts = [s.timestamp_ns for s in p.snapshots]
        gaps = sorted(b - a for a, b in zip(ts, ts[1:]))
        assert 30e6 <= gaps[len(gaps) // 2] <= 70e6  # median gap ~50 ms
        kinds = [e.event_type for e in p.get_events()]
        assert kinds.count(MemoryEventType.SNAPSHOT) == len(p.snapshots)
    finally:
        p.close()


def test_stops_on_disable_and_resumes_on_enable():
    p = MemoryProfiler(snapshot_interval_ms=20)
    try:
        assert wait_for(lambda: len(p.snapshots) >= 2)
        snapper = p._snapshotter
        p.disable()
        assert not snapper.running  # disable() joined the thread
        n = len(p.snapshots)
        time.sleep(0.1)
        assert len(p.snapshots) == n
        p.enable()
        assert wait_for(lambda: len(p.snapshots) >= n + 2)
    finally:
        p.close()
    assert p._snapshotter is None


def test_snapshot_counters_are_exact():
    p = MemoryProfiler(snapshot_interval_ms=20)
    try:
        p.track_allocation(0x1000, 1000, "CPU")
        p.track_allocation(0x9000, 500, "Pinned")
        p.track_deallocation(0x1000)
        changed = time.time_ns()
        assert wait_for(lambda: p.snapshots and p.snapshots[-1].timestamp_ns > changed)
        s = p.snapshots[-1]
        assert s.current_usage_bytes == 500
        assert s.peak_usage_bytes == 1500
        assert s.usage_by_type == {"CPU": 0, "Pinned": 500}
        assert s.usage_by_device == {-1: 500}
        assert s.step == 0
        assert isinstance(s.devices, (str, list))  # NVML answer or "unavailable: ..."
    finally:
        p.close()


def test_snapshotter_skips_while_profiler_disabled():
    prof = CountingProfiler()
    prof.is_enabled = False
    s = AutoSnapshotter(prof, 10).start()
    time.sleep(0.08)
    assert prof.calls == [] and s.count == 0
    prof.is_enabled = True
    assert wait_for(lambda: s.count >= 2)
    assert s.stop()


def test_interval_change_applies_to_next_tick():
    prof = CountingProfiler()
    s = AutoSnapshotter(prof, 1000).start()
    s.interval_ms = 10  # the first (1 s) wait is already scheduled
    time.sleep(0.05)
    assert s.count == 0
    assert s.stop()
    s.start()
    assert wait_for(lambda: s.count >= 3)
    assert s.stop()


def test_stop_joins_is_idempotent_and_restartable():
    prof = CountingProfiler()
    s = AutoSnapshotter(prof, 5)
    assert s.stop()  # never started
    s.start()
    s.start()  # no second thread
    assert sum(t.name == "torchmem-snapshots" and t.is_alive()
               for t in threading.enumerate()) >= 1
    assert wait_for(lambda: s.count >= 1)
    assert s.stop() and not s.running
    n = s.count
    time.sleep(0.03)
    assert s.count == n
    assert s.stop()
    with AutoSnapshotter(prof, 5) as s2:
        assert wait_for(lambda: s2.count >= 1)
    assert not s2.running


def test_errors_are_counted_not_raised():
    prof = CountingProfiler(fail=True)
    s = AutoSnapshotter(prof, 5).start()
    assert wait_for(lambda: s.errors >= 3)
    assert s.running and isinstance(s.last_error, RuntimeError)
    assert s.stop()


def test_does_not_keep_profiler_or_itself_alive():
    prof = CountingProfiler()
    s = AutoSnapshotter(prof, 5).start()
    thread = s._thread
    pref = weakref.ref(prof)
    del prof
    gc.collect()
    assert pref() is None
    thread.join(2)
    assert not thread.is_alive()

    prof = CountingProfiler()
    s = AutoSnapshotter(prof, 60_000).start()  # a long wait, woken by the snapshotter's death
    thread = s._thread
    del s
    gc.collect()
    thread.join(2)
    assert not thread.is_alive()


def test_stop_from_inside_a_snapshot():
    class SelfStopping(CountingProfiler):
        def track_snapshot(self):
            super().track_snapshot()
            assert snapper.stop()

    prof = SelfStopping()
    # Bound before it starts: a first tick inside start() must find the name.
    snapper = AutoSnapshotter(prof, 5)
    snapper.start()
    thread = snapper._thread
    thread.join(2)
    assert not thread.is_alive() and len(prof.calls) == 1


def test_atexit_hook_stops_running_snapshotters():
    s = AutoSnapshotter(CountingProfiler(), 5).start()
    snapshots._stop_all()
    assert not s.running


def test_interpreter_exits_cleanly_with_snapshots_running():
    script = textwrap.dedent("""
        import torchmem, time
        p = torchmem.MemoryProfiler(snapshot_interval_ms=1)
        deadline = time.monotonic() + 20
        while len(p.snapshots) < 5 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(p.snapshots) >= 5
        print("ok")  # and exit with the thread still running
    """)
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok" and "Traceback" not in out.stderr
    assert time.monotonic() - start < 50


def test_bad_interval():
    with pytest.raises(ValueError):
        AutoSnapshotter(CountingProfiler(), 0)


def test_disable_while_a_snapshot_runs_is_prompt(monkeypatch):
    from torchmem.sources import nvml

    monkeypatch.setattr(snapshots, "JOIN_TIMEOUT_S", 3.0)
    inside = threading.Event()

    class SlowNvml(nvml.RecordedNvml):
        def nvmlDeviceGetCount(self):
            inside.set()
            time.sleep(0.2)  # the snapshot is in progress while disable() runs
            return 0

    nvml.use_backend(SlowNvml({"devices": []}))
    p = MemoryProfiler(snapshot_interval_ms=5)
    try:
        assert inside.wait(5)
        t = time.monotonic()
        p.disable()
        assert time.monotonic() - t < 2.0
    finally:
        p.close()
        nvml.use_backend(None)
