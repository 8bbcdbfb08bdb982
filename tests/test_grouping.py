"""Breakdowns at many moments at once (analysis._grouping) equal one moment at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchmem.analysis.breakdown import BY, _step_records, read_moments
from torchmem.analysis._grouping import groups_at

from _attribution_helpers import CNN, MLP, attributed, batches, train


def _sgd(params):
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("model, opt, shape", [(lambda: MLP(64, 256, 10), torch.optim.Adam, (8, 64)),
                                               (CNN, _sgd, (4, 3, 8, 8))])
def test_groups_at_many_moments_equal_groups_at_each(model, opt, shape):
    with attributed(capture_stack_traces=True) as prof:
        train(model, opt, batches(shape, 10, 4), prof)
        m = read_moments(prof)
        steps = [s.peak_seq for s in _step_records(m)]
        assert len(steps) == 5  # steps 0-3, and the step after the last optimizer.step()
        seqs = np.array(steps + [prof.peak_seq, 0, 17, prof.next_seq - 1])
        for by in BY:
            many = groups_at(m, seqs, by)
            assert len(many) == len(seqs)
            for seq, got in zip(seqs.tolist(), many):
                one = {k: v for k, v in m.groups(seq, by).items() if v}
                assert list(got.items()) == list(one.items()), (by, seq)
        report = prof.peak_report(top=3)
        for step, peak in zip(_step_records(m), report.steps):
            assert peak.by_category == {k: v for k, v in m.groups(step.peak_seq, "category").items()
                                        if v}
            assert sum(peak.by_category.values()) == peak.bytes
