"""Side records that leave memory once stored (issue 12, goal 2): GC records,
snapshots and attribution marks of a live run with a storage that reads them
back stay bounded in memory, and every query still answers as before."""

from __future__ import annotations

import pytest
import torch

from torchmem import MemoryProfiler
from torchmem._held_records import HeldRecords
from torchmem._contexts import MARK_CATEGORIES
from torchmem._types import MemoryEventType
from torchmem.storage import InMemoryStorage, SQLiteStorage, load

from _attribution_helpers import attributed, batches, train

HELD, MARKS_HELD, N = 4, 8, 40


@pytest.fixture
def small_bounds(monkeypatch):
    monkeypatch.setattr(MemoryProfiler, "side_records_held", HELD)
    monkeypatch.setattr(MemoryProfiler, "marks_held", MARKS_HELD)


def _run(p: MemoryProfiler):
    """N allocations, each marked once; the even ones freed; a GC record and a
    snapshot per allocation; a hand-over to the storage after each."""
    gcs, snaps, marks = [], [], []
    for i in range(N):
        address = 0x10000 + 64 * i
        p.track_allocation(address, 64)
        marks.append((p.next_seq, address, "gradient", 0))
        p.add_marks([(address, "gradient", 0)])
        p.record_gc_start(0)
        gcs.append(p.record_gc_end(0, i, 0))
        snaps.append(p.track_snapshot())
        p.flush()
    for i in range(0, N, 2):
        p.track_deallocation(0x10000 + 64 * i)
    p.flush()
    return gcs, snaps, marks


def _tuples(marks):
    return [(q, a, MARK_CATEGORIES[c], x) for q, a, c, x in marks.tolist()]


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
def test_held_side_records_are_bounded_and_queries_read_the_rest_back(
        tmp_path, small_bounds, backend):
    storage = SQLiteStorage(tmp_path / "t.db") if backend == "sqlite" else InMemoryStorage()
    p = MemoryProfiler(storage=storage, auto_snapshot=False)
    gcs, snaps, marks = _run(p)
    # In memory: the last HELD records of each kind, the last MARKS_HELD marks
    # (one chunk per hand-over, so exactly), and the released marks on the
    # allocations still live (the odd ones among the first N - MARKS_HELD).
    assert len(p._gc.items) == HELD and p._gc.first == N - HELD
    assert len(p._snaps.items) == HELD and p._snaps.first == N - HELD
    assert p._marks.first == N - MARKS_HELD and len(p._marks.array()) == MARKS_HELD
    kept = [m for i, m in enumerate(marks[:N - MARKS_HELD]) if i % 2]
    assert _tuples(p._marks.kept) == kept
    # Queries: every record, as recorded.
    assert p.gc_records == gcs
    assert p.get_statistics().gc_count == N
    assert p.snapshots == snaps
    assert _tuples(p.attribution_marks()) == marks
    assert _tuples(p.attribution_marks(3)) == marks[3:]
    assert _tuples(p.live_attribution_marks()) == kept + marks[N - MARKS_HELD:]
    # Marker events find their records, held or read back.
    events = p.get_events()
    gc_ends = [e.details["gc"] for e in events if e.event_type == MemoryEventType.GC_END]
    shots = [e.details["snapshot"] for e in events if e.event_type == MemoryEventType.SNAPSHOT]
    assert gc_ends == gcs and shots == snaps
    leaks = [(x.address, x.size_bytes) for x in p.detect_potential_leaks()]
    p.close()
    if backend == "sqlite":
        storage.wait()
        back = load(tmp_path / "t.db")
        assert back.gc_records == gcs and back.snapshots == snaps
        assert _tuples(back.attribution_marks()) == marks
        assert [(x.address, x.size_bytes) for x in back.detect_potential_leaks()] == leaks


def test_no_release_without_a_storage_that_reads_back(small_bounds):
    p = MemoryProfiler(auto_snapshot=False)  # no storage: everything stays
    for _ in range(10):
        p.record_gc_start(0)
        p.record_gc_end(0, 0, 0)
    p.release_stored({"gc": 10, "snapshots": 0, "marks": 0})
    assert len(p._gc.items) == 10 and p._gc.first == 0
    p.close()


def test_a_training_run_answers_the_same_with_its_marks_released(tmp_path, monkeypatch):
    # A real run (attribution on, marks every step): the same breakdowns,
    # peak report and leak list with 8 marks held as with all of them.
    def run(name: str, marks_held: int):
        monkeypatch.setattr(MemoryProfiler, "marks_held", marks_held)
        monkeypatch.setattr(MemoryProfiler, "side_records_held", 2)
        storage = SQLiteStorage(tmp_path / name)
        with attributed(storage=storage) as p:
            train(lambda: torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                              torch.nn.Linear(16, 4)),
                  lambda ps: torch.optim.Adam(ps, lr=1e-3),
                  batches((4, 8), 4, n=30), p, check=lambda *a: p.flush())
            p.flush()
            held = len(p._marks.array())
            out = (len(p.attribution_marks()),
                   {k: p.breakdown("category", at=k) for k in ("peak", "now")},
                   p.breakdown("module", at=5),
                   [(x.address, x.size_bytes) for x in p.detect_potential_leaks()],
                   [s.peak_bytes for s in p.step_peaks()])
        return held, out

    held_all, all_marks = run("all.db", 1 << 30)
    held_few, released = run("few.db", 8)
    assert held_few < held_all and all_marks[0] > 8 * 2
    # Allocation addresses differ between the two runs; the answers do not.
    assert released[0] == all_marks[0] and released[1:3] == all_marks[1:3]
    assert len(released[3]) == len(all_marks[3])
    assert [b for _, b in released[3]] == [b for _, b in all_marks[3]]
    assert released[4] == all_marks[4]


class _FailedStorage(InMemoryStorage):
    write_error = "given up: a test"  # what SQLiteStorage says once it stopped storing


def test_a_storage_that_stopped_storing_keeps_everything_in_memory(small_bounds):
    p = MemoryProfiler(storage=_FailedStorage(), auto_snapshot=False)
    gcs, snaps, marks = _run(p)
    assert p._gc.first == p._snaps.first == p._marks.first == 0
    assert len(p._gc.items) == len(p._snaps.items) == N
    assert p.gc_records == gcs and p.snapshots == snaps
    assert _tuples(p.attribution_marks()) == marks
    p.close()


def test_marker_details_read_back_in_blocks(tmp_path, small_bounds, monkeypatch):
    monkeypatch.setattr(HeldRecords, "BLOCK", 8)
    p = MemoryProfiler(storage=SQLiteStorage(tmp_path / "t.db"), auto_snapshot=False)
    gcs, _, _ = _run(p)
    reads = []
    read = p.storage.read_side_records
    monkeypatch.setattr(p.storage, "read_side_records",
                        lambda *a: reads.append(a) or read(*a))
    got = [p._details(int(MemoryEventType.GC_END), i)["gc"] for i in range(N)]
    assert got == gcs
    # The released ones (N - HELD) in blocks of 8, each read once.
    assert reads == [("gc", b, b + 8) for b in range(0, N - HELD, 8)]
    p.close()


def test_held_records_number_release_and_index():
    r = HeldRecords("gc")
    assert [r.append(f"r{i}") for i in range(5)] == [0, 1, 2, 3, 4]
    r.release(stored=4, keep=2)  # 0-3 stored; the latest 2 stay, so 0-2 go
    assert (r.first, r.items, r.next_index) == (3, ["r3", "r4"], 5)
    r.release(stored=2, keep=0)  # nothing new stored: nothing goes
    assert r.first == 3
    assert r.since(0) == ["r3", "r4"] and r.since(4) == ["r4"] and r.since(5) == []
    assert r[3] == "r3" and r.append("r5") == 5
    for missing in (2, 6):
        with pytest.raises(IndexError):
            r[missing]
