"""analysis.run_moments (what the HTML report reads, a window of events at a time)
against the whole-run queries it stands for: breakdown's peak_report,
category_timeline, module_table, peak_stacks and allocation_categories."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchmem.analysis import timeline
from torchmem.analysis.breakdown import _Moments, peak_report
from torchmem.analysis.run_moments import run_moments
from torchmem.export._bands import layout_bands

from _attribution_helpers import CNN, MLP, attributed, batches, train


def _mlp():
    with attributed(capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4, n=5), prof)
        big = torch.ones(4096)  # live at the end
    return prof, big


def _cnn():
    with attributed(capture_stack_traces=True) as prof:
        train(CNN, torch.optim.AdamW, batches((2, 3, 8, 8), 10, n=3), prof)
    return prof, None


def _tree(node):
    return (node.frame, node.bytes, [_tree(c) for c in node.children])


@pytest.mark.parametrize("run", [_mlp, _cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("batch", [5, 97, 1 << 17])
def test_every_moment_shown_is_the_whole_runs(run, batch):
    prof, _ = run()
    n = prof.next_seq
    got = run_moments(prof, points=n + 10, top=3, batch=batch)
    m = _Moments(prof)
    want_tl = timeline.category_timeline(prof, n + 10, moments=m)
    np.testing.assert_array_equal(got.timeline.seq, want_tl.seq)
    np.testing.assert_array_equal(got.timeline.timestamp_ns, want_tl.timestamp_ns)
    np.testing.assert_array_equal(got.timeline.step, want_tl.step)
    for c in want_tl.bytes:
        np.testing.assert_array_equal(got.timeline.bytes[c], want_tl.bytes[c], err_msg=c)
    want = peak_report(prof, top=3, moments=m)
    assert got.report.overall == want.overall
    assert [b.peak for b in got.boxes] == want.steps == got.report.steps
    assert [(b.first_step, b.last_step) for b in got.boxes] == [(s.step, s.step)
                                                               for s in want.steps]
    assert got.report.format() == want.format()
    assert got.modules == timeline.module_table(prof, moments=m)
    assert _tree(got.stacks) == _tree(timeline.peak_stacks(prof, moments=m))
    assert got.n_events == n and got.first_seq == 0
    # The bands: the same allocations drawn, each with its category when made.
    lt = m.lt
    whole = layout_bands(lt.alloc_seq, lt.free_seq, lt.size, want_tl.seq, want_tl.total(),
                         max_bands=1000)
    mine = layout_bands(got.bands.alloc_seq, got.bands.free_seq, got.bands.size,
                        got.timeline.seq, got.timeline.total(), max_bands=1000)
    cats = timeline.allocation_categories(prof, moments=m)
    assert [(int(lt.alloc_seq[i]), cats.get(int(lt.alloc_seq[i]), "other"))
            for i in whole.index] == \
        [(int(got.bands.alloc_seq[i]), got.band_categories[i]) for i in mine.index]
    assert len(whole.index) > 20


def test_few_points_still_catch_the_peak_and_every_step():
    prof, _ = _mlp()
    got = run_moments(prof, points=30, batch=64)
    m = _Moments(prof)
    want = timeline.category_timeline(prof, 30, moments=m)
    np.testing.assert_array_equal(got.timeline.seq, want.seq)
    for c in want.bytes:
        np.testing.assert_array_equal(got.timeline.bytes[c], want.bytes[c])
    assert got.timeline.total().max() == prof.get_statistics().peak_usage_bytes
    assert [b.peak for b in got.boxes] == peak_report(prof, moments=m, top=5).steps
    # A module's peak is the highest at the moments shown: never above its true one.
    true = {r.module: r for r in timeline.module_table(prof, moments=m)}
    for row in got.modules:
        assert row.peak_bytes <= true[row.module].peak_bytes
        assert (row.at_peak_bytes, row.at_peak_by_category) == \
            (true[row.module].at_peak_bytes, true[row.module].at_peak_by_category)


def test_past_max_steps_steps_share_a_box_shown_by_their_highest_peak():
    prof, _ = _mlp()
    steps = peak_report(prof).steps
    got = run_moments(prof, max_steps=2)
    assert [(b.first_step, b.last_step) for b in got.boxes] == [(0, 2), (3, 5)]
    for b in got.boxes:
        members = [s for s in steps if b.first_step <= s.step <= b.last_step]
        assert b.peak.step == max(members, key=lambda s: s.bytes).step
    rows = prof.event_rows_from(0)
    first_of = {int(s): int(rows["seq"][np.flatnonzero(rows["step"] == s)[0]]) for s in (0, 3)}
    assert [(b.first_seq, b.end_seq) for b in got.boxes] == \
        [(first_of[0], first_of[3]), (first_of[3], int(rows["seq"][-1]) + 1)]


def test_an_empty_profiler():
    with attributed() as prof:
        pass
    got = run_moments(prof)
    assert got.report.overall is None and got.boxes == [] and got.modules == []
    assert len(got.timeline.seq) == 0 and got.stacks.bytes == 0 and len(got.bands) == 0
