"""The host tracker against independent measures of live CPU tensor memory."""

from __future__ import annotations

import gc
import sys
import threading

import numpy as np
import pytest
import torch

from torchmem import MemoryEventType, MemoryProfiler
from torchmem.sources.host import HostTracker

from _host_helpers import check_mlp_adam, reachable_bytes


@pytest.fixture
def prof():
    p = MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()


def cpu_bytes(p: MemoryProfiler) -> int:
    return p.get_statistics_for_type("CPU").current_usage_bytes


# A Python scalar operand becomes an 8-byte double tensor plus a 4-byte float
# copy inside the op; torch.profiler sees those temporaries, the dispatch mode
# cannot (they never leave the op). This is the most peak may differ by.
SCALAR_TEMPORARIES = 8 + 4


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_mlp_adam_exact_at_every_step(prof, variant):
    check_mlp_adam(prof, HostTracker(prof), variant, peak_shortfall=SCALAR_TEMPORARIES)
    assert cpu_bytes(prof) == 0
    assert prof.detect_potential_leaks() == []
    assert prof.anomalies["total"] == 0


def test_tensors_from_before_start_picked_up_on_first_use(prof):
    before = torch.ones(250)  # 1000 bytes, made while no tracker runs
    with HostTracker(prof):
        assert cpu_bytes(prof) == 0
        out = before + 1
        assert cpu_bytes(prof) == 2000
    del before
    assert cpu_bytes(prof) == 1000  # frees are still reported after stop()
    del out
    assert cpu_bytes(prof) == 0
    assert prof.anomalies["total"] == 0


def test_views_and_inplace_count_one_storage(prof):
    with HostTracker(prof):
        a = torch.zeros(100)
        v = a[10:20].view(2, 5)
        a.add_(1)
        v.mul_(2)
        assert cpu_bytes(prof) == 400
        assert prof.get_statistics().allocation_count == 1
        del a
        assert cpu_bytes(prof) == 400  # the view keeps the storage alive
        del v
        assert cpu_bytes(prof) == 0


def test_resize_is_a_reallocation(prof):
    with HostTracker(prof):
        x = torch.empty(10)
        assert cpu_bytes(prof) == 40
        x.resize_(1000)
        assert cpu_bytes(prof) == 4000
        x.resize_(5)  # shrinking keeps the allocation
        assert cpu_bytes(prof) == 4000
        kinds = [e.event_type for e in prof.get_events()]
        assert kinds.count(MemoryEventType.REALLOCATION) == 1
        x.untyped_storage().resize_(0)  # not an op: seen at the next op output
        x.set_(x.untyped_storage(), 0, (0,))
        assert cpu_bytes(prof) == 0
        x.resize_(8)
        assert cpu_bytes(prof) == 32
        d = torch.ones(3, dtype=torch.float64)
        out = torch.empty(0, dtype=torch.float64)  # zero bytes: nothing allocated yet
        torch.add(d, 1, out=out)  # out= grows it inside the op
        assert cpu_bytes(prof) == 32 + 24 + 24
        del x, d, out
    assert cpu_bytes(prof) == 0
    assert prof.anomalies["total"] == 0


def test_backward_grads_are_tracked(prof):
    w = torch.nn.Parameter(torch.randn(100))
    with HostTracker(prof):
        (w * w).sum().backward()
        grad_bytes = w.grad.untyped_storage().nbytes()
        assert cpu_bytes(prof) == 400 + grad_bytes
        w.grad = None
        assert cpu_bytes(prof) == 400
    del w
    assert cpu_bytes(prof) == 0


def test_skips_meta_zero_size_and_external_memory(prof):
    arr = np.ones(100, dtype=np.float32)
    with HostTracker(prof):
        torch.empty(1000, device="meta").add_(1)
        torch.empty(0).add_(1)
        ext = torch.from_numpy(arr)
        ext.add_(1)
        assert cpu_bytes(prof) == 0
    with HostTracker(prof, track_external=True):
        ext.add_(1)
        assert cpu_bytes(prof) == 400
    del ext
    assert cpu_bytes(prof) == 0


def test_pinned_tensors_are_labelled_pinned(prof):
    try:
        torch.ones(1).pin_memory()
    except RuntimeError as exc:
        pytest.skip(f"pin_memory needs an accelerator on this build: {exc}")
    with HostTracker(prof):
        p = torch.ones(256).pin_memory()
        p.add_(1)
        assert prof.get_statistics_for_type("Pinned").current_usage_bytes == 1024
    del p
    assert prof.get_statistics_for_type("Pinned").current_usage_bytes == 0


def test_pinned_label_comes_from_is_pinned(prof):
    # The labelling logic, where pinned memory cannot exist: is_pinned() stubbed.
    tracker = HostTracker(prof)
    tracker._is_pinned = lambda t: t.numel() == 256
    with tracker:
        a = torch.ones(256)
        b = torch.ones(10)
        assert prof.get_statistics_for_type("Pinned").current_usage_bytes == 1024
        assert cpu_bytes(prof) == 40
    del a, b
    assert prof.get_statistics().current_usage_bytes == 0


def test_disabled_profiler_is_not_fed(prof):
    with HostTracker(prof):
        prof.disable()
        a = torch.ones(100)
        prof.enable()
        assert cpu_bytes(prof) == 0
        b = a + 0  # first use while enabled picks `a` up
        assert cpu_bytes(prof) == 800
        del a, b
    assert cpu_bytes(prof) == 0


class _ReentryProfiler(MemoryProfiler):
    """Notes frees that arrive while the tracker's own bookkeeping is running."""

    reentrant_frees = 0

    def track_deallocation(self, address, size_bytes=None):
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name in ("register", "see", "dispatch", "resized") and \
                    f.f_code.co_filename.endswith("host.py"):
                self.reentrant_frees += 1
                break
            f = f.f_back
        return super().track_deallocation(address, size_bytes)


class _Node:
    # No __dict__: linking two nodes allocates nothing, so a cycle dropped
    # right away is still young and the next gen-0 collection frees it.
    __slots__ = ("other", "t")


def test_reentrant_under_gc_heavy_workload():
    prof = _ReentryProfiler(auto_snapshot=False)
    old = gc.get_threshold()
    gc.collect()
    gc.set_threshold(1, 10, 10)  # a gen-0 collection at almost every allocation
    try:
        with HostTracker(prof):
            keep = []
            for i in range(300):
                t = torch.full((64,), float(i))
                a, b = _Node(), _Node()
                a.other, b.other, a.t = b, a, t
                del a, b, t  # garbage only the collector can free
                if i % 3 == 0:
                    keep.append(torch.ones(16) * 2)
            gc.collect()
            assert cpu_bytes(prof) == reachable_bytes() == 100 * 64
            del keep
            assert cpu_bytes(prof) == 0
    finally:
        gc.set_threshold(*old)
    assert prof.reentrant_frees > 0  # callbacks did fire inside the tracker
    assert prof.anomalies["total"] == 0
    s = prof.get_statistics()
    # 300 cycled tensors + 100 * (ones, its product); the scalar operand
    # reaches the mode as a Python number, not a tensor
    assert s.allocation_count == s.deallocation_count == 300 + 200
    prof.close()


def test_frees_on_another_thread(prof):
    with HostTracker(prof):
        ts = [torch.ones(100) for _ in range(50)]
    assert cpu_bytes(prof) == 50 * 400
    worker = threading.Thread(target=ts.clear)
    worker.start()
    worker.join()
    assert cpu_bytes(prof) == 0
    assert prof.anomalies["total"] == 0


def test_stack_names_the_user_not_the_tracker():
    p = MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    with HostTracker(p):
        t = torch.ones(10)  # noqa: F841 - the allocation site
    (leak,) = p.detect_potential_leaks()
    assert leak.stack_trace is not None
    filename, _line, function = leak.stack_trace.frames[0]
    assert filename == __file__
    assert function == "test_stack_names_the_user_not_the_tracker"
    p.close()


def test_start_stop_idempotent_and_ordered(prof):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Other(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    h = HostTracker(prof)
    h.start()
    h.start()
    assert h.active
    with Other():
        with pytest.raises(RuntimeError):
            h.stop()
    h.stop()
    h.stop()
    assert not h.active
    a = torch.ones(10)  # noqa: F841
    assert cpu_bytes(prof) == 0


def test_frees_reported_after_the_tracker_object_is_dropped(prof):
    from torchmem.sources import host

    with HostTracker(prof) as tracker:
        t = torch.ones(100)
    reg = tracker._reg
    del tracker
    gc.collect()  # the records must survive the collector
    assert id(reg) in host._KEEP_ALIVE
    del t
    assert cpu_bytes(prof) == 0
    assert id(reg) not in host._KEEP_ALIVE  # stopped, nothing live: released


def test_trackers_of_one_profiler_share_what_is_live(prof):
    a = torch.ones(100)
    with HostTracker(prof):
        b = a + 1
    with HostTracker(prof), HostTracker(prof):  # a new tracker, and two at once
        c = a + b
    assert cpu_bytes(prof) == 1200
    assert prof.get_statistics().allocation_count == 3
    del a, b, c
    assert cpu_bytes(prof) == 0
    assert prof.anomalies["total"] == 0
