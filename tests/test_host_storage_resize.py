"""The dispatch-mode tracker sees ``untyped_storage().resize_(n)`` (issue 13 item 8).

FSDP frees a parameter's memory with ``param.untyped_storage().resize_(0)``
and brings it back with ``resize_(nbytes)`` before the next all-gather; a
storage resize is not an op, so no dispatch mode sees it.
"""

from __future__ import annotations

import gc

import pytest
import torch

from torchmem import MemoryEventType, MemoryProfiler
from torchmem.sources.host import HostTracker


@pytest.fixture
def prof():
    p = MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()


def cpu(p: MemoryProfiler) -> int:
    return p.get_statistics_for_type("CPU").current_usage_bytes


def test_resize_to_zero_and_regrowth(prof):
    with HostTracker(prof):
        w = torch.nn.Parameter(torch.zeros(1000))  # 4000 bytes
        assert cpu(prof) == 4000
        w.untyped_storage().resize_(0)  # how FSDP frees
        assert cpu(prof) == 0
        w.untyped_storage().resize_(4000)  # and brings it back before the all-gather
        assert cpu(prof) == 4000
        with torch.no_grad():
            w.copy_(torch.ones(1000))
        assert cpu(prof) == 4000
        w.untyped_storage().resize_(8000)  # growth in place or a move
        assert cpu(prof) == 8000
        w.untyped_storage().resize_(0)
        assert cpu(prof) == 0
        w.untyped_storage().resize_(400)
    assert cpu(prof) == 400
    del w
    gc.collect()
    assert cpu(prof) == 0
    assert prof.anomalies["total"] == 0
    kinds = [e.event_type for e in prof.get_events()]
    assert kinds.count(MemoryEventType.DEALLOCATION) >= 3


def test_fsdp_like_loop(prof):
    params = [torch.nn.Parameter(torch.randn(256)) for _ in range(4)]
    with HostTracker(prof) as tracker:
        tracker.adopt(params)
        full = sum(p.untyped_storage().nbytes() for p in params)
        assert cpu(prof) == full
        for _ in range(3):
            for p in params:  # reshard after forward
                p.untyped_storage().resize_(0)
            assert cpu(prof) == 0
            for p in params:  # unshard before backward
                p.untyped_storage().resize_(256 * 4)
                with torch.no_grad():
                    p.copy_(torch.randn(256))
            assert cpu(prof) == full
    assert prof.anomalies["total"] == 0


def test_a_storage_first_seen_at_its_regrowth(prof):
    t = torch.zeros(10)
    s = t.untyped_storage()
    s.resize_(0)
    with HostTracker(prof):
        s.resize_(1024)
        assert cpu(prof) == 1024
    del t, s
    gc.collect()
    assert cpu(prof) == 0 and prof.anomalies["total"] == 0


def test_untracked_resizes_change_nothing_and_torch_is_restored(prof):
    original = torch.UntypedStorage.resize_
    with HostTracker(prof):
        pass
    del prof
    gc.collect()
    assert torch.UntypedStorage.resize_ is original  # nothing of ours left behind
    t = torch.zeros(4)
    t.untyped_storage().resize_(0)
    assert t.untyped_storage().nbytes() == 0
