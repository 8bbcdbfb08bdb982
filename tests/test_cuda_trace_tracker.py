"""The trace tracker's native half, driven with the trace entries torch's
caching allocator makes (what the run-time-built AllocatorTraceTracker
forwards): recorder events, the segment model, fragmentation, OOM, adoption
of blocks from before the start, and stacks read before torch's lock."""

from __future__ import annotations

import inspect
import threading

import pytest

import torchmem
from _cuda_helpers import detach_recorder, lib
from torchmem import MemoryEventType, _native
from torchmem.sources import cuda_tracker as ct
from torchmem.sources._cuda_native import HOOK_API, hook_api

ALLOC, FREE_REQUESTED, FREE_COMPLETED, SEG_ALLOC, SEG_FREE, SEG_MAP, SEG_UNMAP, SNAPSHOT, OOM = range(9)
MiB = 1 << 20
SEG = 0x7f0000000000  # a 20 MiB segment on device 0
STREAM = 0x33


def trace(action, device, address, size, stream=STREAM):
    lib.torchmem_cuda_trace_event(action, device, address, size, stream)


@pytest.fixture
def prof():
    lib.torchmem_cuda_trace_reset()
    lib.torchmem_cuda_trace_set_recording(1)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    _native.set_gpu_recorder(p)
    _native.set_stack_capture(False, 10)
    try:
        yield p
    finally:
        detach_recorder()
        _native.set_stack_capture(False, 10)
        lib.torchmem_cuda_trace_reset()
        p.close()


def test_alloc_and_free_completed_become_events(prof):
    trace(SEG_ALLOC, 0, SEG, 20 * MiB)
    trace(ALLOC, 0, SEG, 1000)
    trace(FREE_REQUESTED, 0, SEG, 1000)  # a free waiting on streams: nothing yet
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 1000
    trace(FREE_COMPLETED, 0, SEG, 1000)
    events = prof.get_events()
    assert [(e.event_type, e.address, e.size_bytes, e.device, e.stream, e.allocation_type)
            for e in events] == [
        (MemoryEventType.ALLOCATION, SEG, 1000, 0, STREAM, "GPU"),
        (MemoryEventType.DEALLOCATION, SEG, 1000, 0, STREAM, "GPU")]
    assert prof.anomalies["total"] == 0


def test_reserved_allocated_segments_and_free_ranges(prof):
    trace(SEG_ALLOC, 0, SEG, 20 * MiB)
    trace(SEG_ALLOC, 1, SEG + (1 << 36), 2 * MiB)
    trace(ALLOC, 0, SEG, 3 * MiB)                  # [0, 3)
    trace(ALLOC, 0, SEG + 5 * MiB, 1000)           # [5 MiB, +1024)
    trace(ALLOC, 0, SEG + 12 * MiB, 4 * MiB)       # [12, 16)
    s = ct.gpu_memory_state(0)
    assert (s.reserved_bytes, s.allocated_bytes, s.segment_count, s.block_count) == (
        20 * MiB, 7 * MiB + 1000, 1, 3)
    # Free ranges: [3, 5) = 2 MiB, [5 MiB + 1024, 12 MiB) , [16, 20) = 4 MiB.
    middle = 7 * MiB - 1024
    assert s.largest_free_bytes == middle
    assert s.free_bytes == 2 * MiB + middle + 4 * MiB
    # A request of 5 MiB fits only the middle range: the other two can't serve it.
    assert ct.fragmented_bytes(5 * MiB, 0) == 6 * MiB
    assert s.fragmented_bytes(1 * MiB) == 0
    assert ct.fragmented_bytes(64 * MiB, 0) == s.free_bytes
    [seg] = ct.gpu_segments(0)
    assert (seg.address, seg.size_bytes, seg.allocated_bytes, seg.largest_free_bytes,
            seg.block_count, seg.stream, seg.expandable) == (
        SEG, 20 * MiB, 7 * MiB + 1000, middle, 3, STREAM, False)
    both = ct.gpu_memory_state()
    assert (both.device, both.reserved_bytes, both.segment_count) == (None, 22 * MiB, 2)
    assert [g.device for g in ct.gpu_segments()] == [0, 1]
    for addr, size in ((SEG, 3 * MiB), (SEG + 5 * MiB, 1000), (SEG + 12 * MiB, 4 * MiB)):
        trace(FREE_COMPLETED, 0, addr, size)
    trace(SEG_FREE, 0, SEG, 20 * MiB)
    s = ct.gpu_memory_state(0)
    assert (s.reserved_bytes, s.allocated_bytes, s.segment_count, s.reserved_peak_bytes,
            s.allocated_peak_bytes) == (0, 0, 0, 20 * MiB, 7 * MiB + 1000)
    lib.torchmem_cuda_trace_reset_peak(0)
    assert ct.gpu_memory_state(0).reserved_peak_bytes == 0


def test_expandable_segments_map_and_unmap_ranges(prof):
    trace(SEG_MAP, 0, SEG, 2 * MiB)
    trace(SEG_MAP, 0, SEG + 2 * MiB, 2 * MiB)  # grows: one segment of 4 MiB
    trace(ALLOC, 0, SEG, 1 * MiB)
    [seg] = ct.gpu_segments(0)
    assert (seg.size_bytes, seg.expandable, seg.largest_free_bytes) == (4 * MiB, True, 3 * MiB)
    trace(SEG_UNMAP, 0, SEG + 3 * MiB, 1 * MiB)  # the tail goes back
    assert ct.gpu_memory_state(0).reserved_bytes == 3 * MiB
    assert ct.gpu_segments(0)[0].largest_free_bytes == 2 * MiB
    trace(FREE_COMPLETED, 0, SEG, 1 * MiB)


def test_oom_records_the_event_and_the_segment_state(prof):
    trace(SEG_ALLOC, 0, SEG, 8 * MiB)
    trace(ALLOC, 0, SEG + 2 * MiB, 2 * MiB)  # free: [0, 2) and [4, 8)
    trace(OOM, 0, 512 * MiB, 6 * MiB)        # address = device free bytes, size = request
    [oom] = prof.oom_events
    assert (oom.requested_bytes, oom.device, oom.device_free_bytes, oom.live_bytes,
            oom.stream) == (6 * MiB, 0, 512 * MiB, 2 * MiB, STREAM)
    state = ct.last_oom_state()
    assert state == ct.GpuOomState(device=0, requested_bytes=6 * MiB, device_free_bytes=512 * MiB,
                                   reserved_bytes=8 * MiB, allocated_bytes=2 * MiB,
                                   largest_free_bytes=4 * MiB, fragmented_bytes=6 * MiB,
                                   oom_count=1, free_bytes=6 * MiB)
    assert ct.gpu_memory_state(0).oom_count == 1
    trace(FREE_COMPLETED, 0, SEG + 2 * MiB, 2 * MiB)


def test_no_oom_yet():
    lib.torchmem_cuda_trace_reset()
    assert ct.last_oom_state() is None


def test_blocks_from_before_the_start_are_adopted_once(prof):
    snap = {"segments": [{"device": 0, "stream": STREAM, "address": SEG, "total_size": 4 * MiB,
                          "blocks": [
                              {"address": SEG, "size": 1024, "requested_size": 1000,
                               "state": "active_allocated"},
                              {"address": SEG + 1024, "size": 3 * MiB, "state": "inactive"},
                              {"address": SEG + 4096, "size": 2048, "requested_size": 2000,
                               "state": "active_allocated"}]}]}
    lib.torchmem_cuda_trace_set_adopting(1)
    # A block freed after torch took the snapshot but before the tracker saw
    # it: its free reached the tracker first, so it must not be adopted.
    trace(FREE_COMPLETED, 0, SEG + 4096, 2000)
    assert ct.adopt_snapshot(snap) == 1
    assert ct.adopt_snapshot(snap) == 0  # twice: nothing new
    lib.torchmem_cuda_trace_set_adopting(0)
    s = ct.gpu_memory_state(0)
    assert (s.reserved_bytes, s.allocated_bytes, s.block_count, s.unknown_frees) == (
        4 * MiB, 1000, 1, 1)
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 1000
    trace(FREE_COMPLETED, 0, SEG, 1000)
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 0
    assert prof.anomalies["total"] == 0


def test_a_free_the_tracker_never_saw_is_not_an_anomaly(prof):
    trace(FREE_COMPLETED, 0, 0xdead000, 64)  # a block from before the start
    assert prof.get_events() == []
    assert prof.anomalies["total"] == 0
    assert ct.gpu_memory_state(0).unknown_frees == 1


def test_recording_off_keeps_the_model(prof):
    lib.torchmem_cuda_trace_set_recording(0)
    trace(ALLOC, 0, SEG, 100)
    assert prof.get_events() == []
    assert ct.gpu_memory_state(0).allocated_bytes == 100
    lib.torchmem_cuda_trace_set_recording(1)
    trace(FREE_COMPLETED, 0, SEG, 100)


def lib_api_stash():
    # What torch's allocator does before its lock: call the context recorder
    # (the run-time-built tracker's, which calls the table's stash_stack) ...
    hook_api().stash_stack()


def test_stacks_are_read_before_the_lock_and_used_by_the_next_alloc(prof):
    _native.set_stack_capture(True, 10)
    line = inspect.currentframe().f_lineno + 1
    lib_api_stash()
    trace(ALLOC, 0, SEG, 64)  # ... then, under the lock, the entry arrives
    trace(ALLOC, 0, SEG + 4096, 64)  # no stash before it: no stack
    first, second = prof.get_events()
    assert first.stack_trace is not None
    frames = first.stack_trace.frames
    assert frames[0][2] == "lib_api_stash"  # the innermost Python frame: the stasher
    assert frames[1][1:] == (line, "test_stacks_are_read_before_the_lock_and_used_by_the_next_alloc")
    assert second.stack_trace is None
    trace(FREE_COMPLETED, 0, SEG, 64)
    trace(FREE_COMPLETED, 0, SEG + 4096, 64)


def test_stacks_stay_with_their_thread(prof):
    _native.set_stack_capture(True, 10)
    lib_api_stash()  # this thread's stash ...
    t = threading.Thread(target=lambda: trace(ALLOC, 0, SEG, 32))
    t.start()
    t.join()  # ... is not another thread's
    [ev] = prof.get_events()
    assert ev.stack_trace is None
    trace(FREE_COMPLETED, 0, SEG, 32)


def test_fragmentation_needs_a_size():
    with pytest.raises(ValueError, match="request_bytes"):
        ct.fragmented_bytes(-1)


def test_native_cost_per_event_pair(prof):
    ns = lib.torchmem_cuda_trace_bench(10_000)
    assert ns > 0
    assert prof.get_statistics_for_type("GPU").allocation_count == 10_000


def test_the_hook_table_has_the_headers_layout():
    api = hook_api()
    assert (api.version, api.size) == (1, __import__("ctypes").sizeof(HOOK_API))
    assert api.backend_name() in (b"async", b"sync", b"host", b"fake")


def test_a_new_profiler_gets_the_blocks_an_earlier_one_saw(prof):
    trace(SEG_ALLOC, 0, SEG, 4 * MiB)
    trace(ALLOC, 0, SEG, 1000)
    second = torchmem.MemoryProfiler(auto_snapshot=False)
    _native.set_gpu_recorder(second)
    assert lib.torchmem_cuda_trace_replay_live() == 1
    assert lib.torchmem_cuda_trace_replay_live() == 0  # already live there
    trace(FREE_COMPLETED, 0, SEG, 1000)  # no unknown free in the new profiler
    assert second.anomalies["total"] == 0
    assert [e.event_type for e in second.get_events()] == [MemoryEventType.ALLOCATION,
                                                            MemoryEventType.DEALLOCATION]
    second.close()


class _FakeHookLib:
    """What load_cuda_hook() returns, for the source's own logic."""

    def __init__(self, attach_status=0):
        self.attach_status = attach_status
        self.calls = []

    def torchmem_cuda_tracker_attach(self, buf, n):
        self.calls.append("attach")
        if self.attach_status:
            buf.value = b"no trace trackers here"
        return self.attach_status

    def torchmem_cuda_tracker_set_stacks(self, on, buf, n):
        self.calls.append(f"stacks {on}")
        return 0


def test_the_source_attaches_at_cudas_initialisation_and_adopts(prof, monkeypatch):
    import torch

    from torchmem.sources import cuda_hook

    fake = _FakeHookLib()
    queued = []
    monkeypatch.setattr(cuda_hook, "load_cuda_hook", lambda: fake)
    monkeypatch.setattr(torch.cuda, "_lazy_call", queued.append)
    snap = {"segments": [{"device": 0, "stream": STREAM, "address": SEG, "total_size": 2 * MiB,
                          "blocks": [{"address": SEG, "size": 512, "requested_size": 500,
                                      "state": "active_allocated"}]}]}
    monkeypatch.setattr(torch.cuda.memory, "_snapshot", lambda *a, **k: snap)
    src = ct.CudaTraceTracker(prof, stacks=True).start()
    assert fake.calls == [] and len(queued) == 1  # nothing until torch initialises CUDA
    queued[0]()  # torch's _lazy_init runs its queued calls
    assert fake.calls == ["attach", "stacks 1"]
    assert src.attached and src.adopted_blocks == 1 and src.error is None
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 500
    src.stop()
    assert fake.calls[-1] == "stacks 0"
    trace(FREE_COMPLETED, 0, SEG, 500)  # stopped: not recorded
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 500


def test_a_failed_deferred_attach_warns_and_never_raises_into_torch(prof, monkeypatch):
    import torch

    from torchmem.sources import cuda_hook

    queued = []
    monkeypatch.setattr(cuda_hook, "load_cuda_hook", lambda: _FakeHookLib(attach_status=-1))
    monkeypatch.setattr(torch.cuda, "_lazy_call", queued.append)
    src = ct.CudaTraceTracker(prof).start()
    with pytest.warns(RuntimeWarning, match="no trace trackers here"):
        queued[0]()
    assert not src.attached and "could not attach" in src.error
    src.stop()


def _fragmented_device(prof):
    # Device 0: one 8 MiB segment, 2 MiB allocated in its middle.
    trace(SEG_ALLOC, 0, SEG, 8 * MiB)
    trace(ALLOC, 0, SEG + 2 * MiB, 2 * MiB)


def test_the_summary_shows_reserved_allocated_and_fragmentation(prof):
    from torchmem.analysis.gpu_segments import GpuAllocatorView, gpu_allocator_views
    from torchmem.reports.summary import format_summary

    _fragmented_device(prof)
    [view] = gpu_allocator_views(prof)
    assert view == GpuAllocatorView(device=0, reserved_bytes=8 * MiB, allocated_bytes=2 * MiB,
                                    segment_count=1, largest_free_bytes=4 * MiB,
                                    free_bytes=6 * MiB)
    assert view.fragmentation == pytest.approx(1 / 3)
    assert ("  GPU 0 torch allocator: 2.00 MiB allocated of 8.00 MiB reserved in 1 segments; "
            "largest free block 4.00 MiB of 6.00 MiB free (fragmentation 33%)") in (
        format_summary(prof).splitlines())
    trace(FREE_COMPLETED, 0, SEG + 2 * MiB, 2 * MiB)


def test_the_oom_report_shows_the_segments_at_the_failure(prof):
    from torchmem.analysis.oom import build_report
    from torchmem.reports.oom import render_text

    _fragmented_device(prof)
    trace(OOM, 0, 100 * MiB, 5 * MiB)
    trace(FREE_COMPLETED, 0, SEG + 2 * MiB, 2 * MiB)  # after the failure: not what it saw
    data = build_report(prof, oom=prof.oom_events[-1])
    assert data["segments"] == {"segments": 1, "reserved": 8 * MiB, "allocated": 2 * MiB,
                                "largest_free": 4 * MiB, "free": 6 * MiB,
                                "fragmented": 6 * MiB, "at_failure": True}
    assert ("Segments at the failure (torch's caching allocator, traced): 1 holding 8.00 MiB, "
            "2.00 MiB allocated; largest free block 4.00 MiB of 6.00 MiB free; 6.00 MiB of it "
            "in ranges smaller than the request (fragmentation)") in render_text(data)


def test_without_the_tracker_reports_show_no_segments(profiler):
    from torchmem.analysis.gpu_segments import gpu_allocator_views, oom_segment_view

    lib.torchmem_cuda_trace_reset()
    profiler.track_allocation(0x1000, 64, "GPU", 0)
    assert gpu_allocator_views(profiler) == []
    assert oom_segment_view(profiler, 0, 64) is None
