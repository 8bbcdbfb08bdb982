"""Following a trace while it is written (storage.follow.TraceFollower) and replaying it
as it grows (MemoryProfiler.extend_from_trace): the same figures as the writing profiler."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

import torchmem
from torchmem import MemoryProfiler, TraceFormatError
from torchmem.analysis.epoch_records import record_of
from torchmem.analysis.sites import group_by_site
from torchmem.epoch import mark_epoch
from torchmem.storage.follow import TraceFollower


def _committed(prof) -> None:
    prof.flush()
    prof.storage.flush()


def _same_figures(replay, prof) -> None:
    assert replay.get_statistics() == prof.get_statistics()
    assert replay.counters_by_type_and_device() == prof.counters_by_type_and_device()
    # The trace knows the steps its events carry (a step() with no event since
    # is not in it).
    assert replay.current_step == int(prof.get_event_rows()["step"][-1])
    a, b = replay.live_allocations(), prof.live_allocations()
    assert (a["address"].tolist(), a["size"].tolist()) == (b["address"].tolist(),
                                                          b["size"].tolist())
    labels = lambda p: sorted((u.site.label, u.bytes, u.count) for u in group_by_site(p).values())
    assert labels(replay) == labels(prof)


def test_polls_replay_to_the_writers_figures_at_each_commit(tmp_path):
    path = tmp_path / "t.db"
    prof = MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False,
                          capture_stack_traces=True)
    follower = TraceFollower(path)
    replay = None
    kept = []
    for i in range(5):
        for j in range(20):
            prof.track_allocation(0x1000 + 64 * (20 * i + j), 100 + j, "CPU" if j % 3 else "GPU",
                                  -1 if j % 3 else 0)
        for j in range(0, 20, 2):
            prof.track_deallocation(0x1000 + 64 * (20 * i + j))
        prof.record_gc_start(0)
        prof.record_gc_end(0, 3, 0)
        kept.append(torch.zeros(8))
        prof.step()
        _committed(prof)
        delta = follower.poll()
        assert not follower._con.in_transaction  # never holds the writer's WAL back
        assert follower.caught_up and not follower.finished
        if replay is None:
            replay = MemoryProfiler.from_trace(delta, retention_events=1 << 16)
        else:
            assert delta.events["seq"][0] == follower.events_read - len(delta.events)
            replay.extend_from_trace(delta)
        _same_figures(replay, prof)
        assert [r.duration_ns for r in replay.gc_records] == \
            [r.duration_ns for r in prof.gc_records]
    assert follower.poll().is_empty()  # nothing new
    prof.close()
    follower.poll()
    assert follower.finished
    follower.close()


def test_a_cap_on_events_catches_up_over_several_polls(tmp_path):
    path = tmp_path / "t.db"
    prof = MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False)
    for i in range(2500):
        prof.track_allocation(0x10 + 16 * i, 8, "CPU", -1)
    prof.close()
    follower = TraceFollower(path, max_events=1000)
    delta = follower.poll()
    sizes = [len(delta.events)]
    replay = MemoryProfiler.from_trace(delta)
    while not follower.caught_up:
        delta = follower.poll()
        sizes.append(len(delta.events))
        replay.extend_from_trace(delta)
    assert sizes == [1000, 1000, 500]
    assert replay.get_statistics().current_usage_bytes == 2500 * 8


def test_not_yet_there_and_not_a_trace(tmp_path):
    missing = TraceFollower(tmp_path / "later.db")
    assert missing.poll() is None and missing.events_read == 0
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    assert TraceFollower(empty).poll() is None  # created, the writer starts next
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE metadata (key TEXT, value TEXT)")
    con.execute("INSERT INTO metadata VALUES ('format', '\"something else\"')")
    con.commit()
    con.close()
    with pytest.raises(TraceFormatError, match="not a torchmem trace"):
        TraceFollower(other).poll()
    text = tmp_path / "notes.db"
    text.write_text("hello " * 100)
    with pytest.raises(TraceFormatError, match="not an SQLite database"):
        TraceFollower(text).poll()


def test_the_epoch_checks_are_in_the_trace_while_it_runs(tmp_path):
    path = tmp_path / "t.db"
    prof = MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False,
                          capture_stack_traces=True)
    follower = TraceFollower(path)
    first = mark_epoch(prof, collect=False)
    prof.track_allocation(0x40, 4096, "CPU", -1)
    prof.step()
    second = mark_epoch(prof, collect=False)
    _committed(prof)
    follower.poll()
    checks = follower.metadata["epoch_checks"]
    assert checks == [record_of(first), record_of(second)]
    assert checks[1]["step"] == 1 and checks[1]["total_grown_bytes"] == 4096
    assert checks[1]["sites"][0]["grown_bytes"] == 4096 and not checks[1]["baseline"]
    prof.close()
    assert torchmem.load(path).trace_metadata["epoch_checks"] == checks


def test_extend_needs_a_replaying_profiler(profiler):
    from torchmem.trace import TraceDelta

    with pytest.raises(TypeError, match="from_trace"):
        profiler.extend_from_trace(TraceDelta())


def test_replaying_in_parts_equals_replaying_whole(tmp_path):
    path = tmp_path / "t.db"
    prof = MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False,
                          capture_stack_traces=True)
    follower = TraceFollower(path, max_events=7)
    for i in range(40):
        prof.track_allocation(0x100 + 8 * i, 1 + i, "CPU", -1)
        if i % 4 == 3:
            prof.track_deallocation(0x100 + 8 * (i - 2))
            prof.step()
    prof.track_snapshot()
    prof.close()
    replay = MemoryProfiler.from_trace(follower.poll())
    while not follower.caught_up:
        replay.extend_from_trace(follower.poll())
    whole = torchmem.load(path)
    _same_figures(replay, whole)
    assert len(replay.snapshots) == len(whole.snapshots) == 1
    assert np.array_equal(replay.get_event_rows()["size"], whole.get_event_rows()["size"])


def test_a_followed_trace_carries_contexts_and_marks(tmp_path):
    # The module, phase and category of every byte come with each poll, in
    # parts as small as one wants: the replay's breakdowns are the writer's.
    from _attribution_helpers import MLP, attributed, batches, train

    path = tmp_path / "t.db"
    with attributed(storage=torchmem.SQLiteStorage(path), capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 3), prof)
        want = {(by, at): prof.breakdown(by, at) for by in ("category", "module", "phase")
                for at in ("peak", "now", 0, 2)}
        prof.flush()
    prof.storage.wait()
    follower = TraceFollower(path, max_events=37)  # parts that cut steps and marks apart
    replay = MemoryProfiler.from_trace(follower.poll(), retention_events=1 << 16)
    polls = 1
    while not follower.caught_up:
        replay.extend_from_trace(follower.poll())
        polls += 1
    assert polls > 3
    assert replay.context_table() == prof.context_table()[:len(replay.context_table())]
    assert len(replay.attribution_marks()) == len(prof.attribution_marks())
    for (by, at), breakdown in want.items():
        assert replay.breakdown(by, at) == breakdown, (by, at)
    # One pass over the followed trace gives breakdown(at=step) of every step.
    from torchmem.analysis.run_moments import step_category_breakdowns

    one_pass = step_category_breakdowns(replay)
    assert set(one_pass) == {int(s) for s in replay.event_rows_from(0)["step"]}
    for step, by_category in one_pass.items():
        assert by_category == replay.breakdown("category", step), step
    assert one_pass[0] == want[("category", 0)] and one_pass[2] == want[("category", 2)]
