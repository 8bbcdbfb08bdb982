"""Attribution over a run (torchmem.analysis.timeline): checked against breakdown()
computed independently at every moment."""

from __future__ import annotations

import numpy as np
import torch

from torchmem.analysis import timeline
from torchmem.analysis.breakdown import _Moments
from torchmem.analysis.categories import CATEGORIES

from _attribution_helpers import MLP, attributed, batches, train


def _run():
    with attributed(capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4), prof)
    return prof


def test_timeline_points_are_exact_and_catch_the_peak():
    prof = _run()
    rows = prof.event_rows_from(0)
    usage = rows["total_allocated"].astype(np.int64) - rows["total_freed"].astype(np.int64)
    t = timeline.category_timeline(prof, points=40)
    assert len(t.seq) == 40 and list(t.bytes) == list(CATEGORIES)
    np.testing.assert_array_equal(t.total(), usage[t.seq])
    assert t.total().max() == prof.get_statistics().peak_usage_bytes
    m = _Moments(prof)
    for i in (0, 13, 39):  # each point is the breakdown at its moment
        at = m.groups(int(t.seq[i]), "category")
        assert {k: int(v[i]) for k, v in t.bytes.items() if v[i]} == at
    assert (np.diff(t.seq) > 0).all() and (np.diff(t.step) >= 0).all()


def test_module_table_against_a_breakdown_at_every_moment():
    prof = _run()
    m = _Moments(prof)
    seqs = prof.event_rows_from(0)["seq"].tolist()
    peaks: dict[str, int] = {}
    for s in seqs:
        for name, nbytes in m.groups(s, "module").items():
            peaks[name] = max(peaks.get(name, 0), nbytes)
    at_peak = prof.breakdown("module", "peak")
    table = timeline.module_table(prof)
    assert {r.module: r.peak_bytes for r in table} == peaks
    assert {r.module: r.at_peak_bytes for r in table if r.at_peak_bytes} == at_peak
    for r in table:
        assert sum(r.at_peak_by_category.values()) == r.at_peak_bytes


def test_peak_stacks_hold_the_peak():
    prof = _run()
    root = timeline.peak_stacks(prof)
    assert root.bytes == prof.get_statistics().peak_usage_bytes
    sites = prof.breakdown("site", "peak")

    def leaves(node, path):
        if not node.children:
            yield path, node.bytes
        for c in node.children:
            yield from leaves(c, path + [c.frame])

    assert sum(b for _, b in leaves(root, [])) == root.bytes
    for node in [root] + root.children:
        assert node.bytes >= sum(c.bytes for c in node.children)
    assert len(sites) >= 1
