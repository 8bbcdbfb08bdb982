"""Per-step memory (torchmem.analysis.steps): exact figures for hand-made event sequences."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

import torchmem
from torchmem.analysis.steps import StepSeries, StepTracker, signed_sizes, step_memory


def _three_steps(p):
    """Step 0: +100 CPU, +200 GPU:0, -100 CPU. Step 1: -200 GPU:0 (first event a free),
    +50 CPU. Step 2: nothing. Step 3: +1000 Pinned (CPU and GPU untouched)."""
    p.track_allocation(1, 100, "CPU", -1)
    p.track_allocation(2, 200, "GPU", 0)
    p.track_deallocation(1)
    p.step()
    p.track_deallocation(2)
    p.track_allocation(3, 50, "CPU", -1)
    p.step()
    p.step()
    p.track_allocation(4, 1000, "Pinned", -1)


def test_peaks_and_currents_per_step_and_pair(profiler):
    _three_steps(profiler)
    recs = list(step_memory(profiler))
    assert [r.step for r in recs] == [0, 1, 3]  # step 2 had no event
    s0, s1, s3 = recs
    assert (s0.current_bytes, s0.peak_bytes, s0.allocation_count) == (200, 300, 2)
    assert s0.peak_by_type_device == {("CPU", -1): 100, ("GPU", 0): 200}
    assert s0.current_by_type_device == {("CPU", -1): 0, ("GPU", 0): 200}
    # The highest level after any of the step's events: the 200 B freed by
    # its first event do not count (as SQL's MAX over the step's rows).
    assert (s1.current_bytes, s1.peak_bytes) == (50, 50)
    assert s1.peak_by_type_device == {("CPU", -1): 50, ("GPU", 0): 0}
    assert s1.current_by_type_device == {("CPU", -1): 50, ("GPU", 0): 0}
    assert (s3.current_bytes, s3.peak_bytes) == (1050, 1050)
    assert s3.peak_by_type_device == {("CPU", -1): 50, ("GPU", 0): 0, ("Pinned", -1): 1000}
    # The last step's per-pair figures are the profiler's own counters now.
    now = profiler.counters_by_type_and_device()
    assert {k: v.current_bytes for k, v in now.items()} == s3.current_by_type_device
    assert max(r.peak_bytes for r in recs) == profiler.get_statistics().peak_usage_bytes


def test_rows_split_anywhere_give_the_same_steps(profiler):
    _three_steps(profiler)
    rows = profiler.get_event_rows()
    whole = list(step_memory(profiler))
    for cut in range(len(rows) + 1):
        series = StepSeries(profiler.type_name)
        got = series.feed(rows[:cut]) + series.feed(rows[cut:]) + series.finish()
        assert got == whole, cut


def test_rows_out_of_order_are_refused(profiler):
    _three_steps(profiler)
    rows = profiler.get_event_rows()
    series = StepSeries(profiler.type_name)
    with pytest.raises(ValueError, match="seq order"):
        series.feed(rows[::-1])


def test_tracker_returns_each_finished_step_once(profiler):
    tracker = StepTracker(profiler)
    assert tracker.update() == []
    profiler.track_allocation(1, 64, "CPU", -1)
    assert tracker.update() == []  # step 0 still running
    profiler.step()
    (s0,) = tracker.update()
    assert (s0.step, s0.peak_bytes) == (0, 64)
    assert tracker.update() == []
    profiler.track_allocation(2, 32, "CPU", -1)
    profiler.track_deallocation(2)
    profiler.step()
    profiler.track_allocation(3, 8, "CPU", -1)
    profiler.step()
    assert [(r.step, r.peak_bytes, r.current_bytes) for r in tracker.update()] == \
        [(1, 96, 64), (2, 72, 72)]
    profiler.track_allocation(5, 1, "CPU", -1)
    (last,) = tracker.update(final=True)  # the step in progress, as it is
    assert (last.step, last.current_bytes) == (3, 73)
    assert tracker.update(final=True) == []


def test_gc_pauses_count_in_the_step_they_ended_in(profiler):
    profiler.track_allocation(1, 10, "CPU", -1)
    profiler.record_gc_start(0)
    profiler.record_gc_end(0, 5, 0)
    profiler.step()
    profiler.track_allocation(2, 10, "CPU", -1)
    recs = list(step_memory(profiler))
    gc = profiler.gc_records[0]
    assert [(r.gc_count, r.gc_time_ns) for r in recs] == [(1, gc.duration_ns), (0, 0)]


def test_signed_sizes_mark_frees_negative_and_markers_zero(profiler):
    _three_steps(profiler)
    profiler.track_snapshot()
    rows = profiler.get_event_rows()
    assert signed_sizes(rows).tolist() == [100, 200, -100, -200, 50, 1000, 0]


def test_step_peaks_match_sql_over_the_trace_file(tmp_path):
    """The per-step peak of a real CPU training trace, against SQLite's own MAX."""
    import torch

    path = tmp_path / "t.db"
    p = torchmem.MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False)
    from torchmem.sources.host import HostTracker

    host = HostTracker(p).start()
    try:
        model = torch.nn.Linear(16, 4)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
            opt.zero_grad()
            p.step()
    finally:
        host.stop()
    recs = list(step_memory(p))
    p.close()
    con = sqlite3.connect(path)
    usage = dict(con.execute("SELECT step, MAX(total_allocated - total_freed) FROM events "
                             "GROUP BY step"))
    end = dict(con.execute("SELECT step, total_allocated - total_freed FROM events e WHERE "
                           "seq = (SELECT MAX(seq) FROM events WHERE step = e.step)"))
    assert len(recs) == len(usage) >= 5
    for r in recs:
        assert (r.peak_bytes, r.current_bytes) == (usage[r.step], end[r.step])
    assert np.sum([r.allocation_count for r in recs]) == \
        con.execute("SELECT COUNT(*) FROM events WHERE kind IN (0, 2)").fetchone()[0]


def test_a_pairs_level_counts_after_another_pairs_event(profiler):
    profiler.track_allocation(1, 50, "CPU", -1)
    profiler.step()
    profiler.track_allocation(2, 10, "GPU", 0)  # the step's first event: CPU is at 50 then
    profiler.track_deallocation(1)
    (_, s1) = step_memory(profiler)
    assert s1.peak_by_type_device == {("CPU", -1): 50, ("GPU", 0): 10}
    assert (s1.peak_bytes, s1.current_bytes) == (60, 10)
