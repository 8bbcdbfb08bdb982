"""analysis.windows: a window of events at a time gives every allocation the category
and module the whole run gives it (analysis.categories over every event)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchmem.analysis.breakdown import _Moments
from torchmem.analysis.windows import LifetimeWindows, windows

from _attribution_helpers import CNN, MLP, Block, attributed, batches, train


def _mlp(accumulate: int = 1):
    with attributed(capture_stack_traces=False) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4, n=6), prof, accumulate=accumulate)
    return prof


def _cnn():
    with attributed(capture_stack_traces=False) as prof:
        train(CNN, torch.optim.AdamW,
              batches((2, 3, 8, 8), 10, n=3), prof)
    return prof


def _block():
    def loss(out, y):
        return out.pow(2).mean()
    with attributed(capture_stack_traces=False) as prof:
        train(Block, torch.optim.Adam, [(torch.randn(2, 5, 32), None)] * 3, prof, loss_fn=loss)
    return prof


def _whole(prof):
    """(alloc_seq, free_seq) -> [(start, end, category, module_ctx)] of the whole run."""
    m = _Moments(prof)
    seg, lt = m.segments, m.lt
    out: dict[tuple[int, int], list] = {}
    for i in np.argsort(seg.start, kind="stable").tolist():
        a = int(seg.alloc[i])
        out.setdefault((int(lt.alloc_seq[a]), int(lt.free_seq[a])), []).append(
            (int(seg.start[i]), int(seg.end[i]), int(seg.category[i]), int(seg.module_ctx[i])))
    return out


def _windowed(prof, batch):
    out: dict[tuple[int, int], list] = {}
    for w in windows(prof, batch=batch):
        seg, lt = w.segments, w.lt
        final = w.final
        for i in np.argsort(seg.start, kind="stable").tolist():
            a = int(seg.alloc[i])
            if not final[a]:
                continue
            key = (int(lt.alloc_seq[a]), int(lt.free_seq[a]))
            out.setdefault(key, []).append(
                (int(seg.start[i]), int(seg.end[i]), int(seg.category[i]),
                 int(seg.module_ctx[i])))
    return out


@pytest.mark.parametrize("run", [_mlp, lambda: _mlp(accumulate=2), _cnn, _block],
                         ids=["mlp", "mlp-accumulate", "cnn", "transformer-block"])
def test_every_window_size_gives_the_whole_runs_categories(run):
    prof = run()
    whole = _whole(prof)
    n = prof.next_seq
    assert len(whole) > 50 and len({c for segs in whole.values() for *_, c, _ in segs}) >= 4
    for batch in (1, 7, 64, n // 3 + 1, n + 5):
        assert _windowed(prof, batch) == whole, batch


def test_a_saved_trace_reads_the_same_windows(tmp_path):
    from torchmem import MemoryProfiler, load
    from torchmem.sources.context import ContextSource
    from torchmem.sources.cpu_allocator import CPUAllocatorHook
    from torchmem.storage import SQLiteStorage

    path = tmp_path / "run.db"
    prof = MemoryProfiler(auto_snapshot=False, storage=SQLiteStorage(path))
    with CPUAllocatorHook(prof, adopt_existing=False), ContextSource(prof):
        train(MLP, torch.optim.Adam, batches((8, 16), 4, n=4), prof)
    whole = _whole(prof)
    prof.close()
    saved = load(path)
    assert _windowed(saved, 50) == whole == _whole(load(path))


def test_a_callback_window_past_the_boundary_matches_the_run_so_far():
    """Windows that look past their boundary (a callback's: the step in progress is
    read again next time) categorise each moment as the whole run so far does."""
    with attributed(capture_stack_traces=False) as prof:
        lw = LifetimeWindows(prof)
        seen = []

        def check(model, opt, step):
            rows = prof.event_rows_from(lw.boundary + 1)
            w = lw.window(rows)
            m_now = _Moments(prof)
            mine = _Moments(prof, w.lt, marks=w.marks)
            for seq in rows["seq"][:: max(1, len(rows) // 15)].tolist():
                assert mine.groups(seq, "category") == m_now.groups(seq, "category"), seq
                assert mine.groups(seq, "module") == m_now.groups(seq, "module"), seq
            # Keep the boundary a few events back: those are read again.
            lw.advance(w, int(rows["seq"][max(0, len(rows) - 4)]))
            seen.append(step)

        train(MLP, torch.optim.Adam, batches((8, 16), 4, n=5), prof, check=check)
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("every", [1, 3])
def test_step_category_tracker_is_breakdown_at_each_step_reading_each_event_about_once(every):
    from torchmem.analysis.category_tracker import StepCategoryTracker
    from torchmem.analysis.steps import StepTracker, step_categories

    with attributed(capture_stack_traces=False) as prof:
        steps, tracker = StepTracker(prof), StepCategoryTracker(prof)
        calls = []

        def check(model, opt, step):
            if step % every:
                return
            done = [r.step for r in steps.update()]
            got = tracker.categories(done)
            assert got == {s: step_categories(prof, s) for s in done}
            assert got[done[-1]]["parameter"] > 0 and got[done[-1]]["optimizer_state"] > 0
            calls.append(done)

        train(MLP, torch.optim.Adam, batches((8, 16), 4, n=9), prof, check=check)
        # The run's last step, still in progress, as a callback's final call reads it.
        done = [r.step for r in steps.update(final=True)]
        assert tracker.categories(done) == {s: step_categories(prof, s) for s in done}
        n = prof.next_seq
    assert [s for c in calls for s in c] + done == list(range(10))
    # Each event read about once (the step in progress again), not once a call.
    assert n <= tracker.events_read < n + 10 * 40


def test_step_category_tracker_without_attribution_says_none():
    from torchmem.analysis.category_tracker import StepCategoryTracker

    class NoBreakdown:
        pass
    assert StepCategoryTracker(NoBreakdown()).categories([0]) is None
