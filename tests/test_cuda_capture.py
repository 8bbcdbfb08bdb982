"""CUDA graph capture under the plugin, on the fake backend: what torch's
graph-pool hooks (beginAllocateToPool / endAllocateToPool, translated by the
compiled allocator class) make the plugin do, call by call."""

from __future__ import annotations

import pytest

from _cuda_helpers import UNIFYING, alloc, fake_backend_profiler, fake_log, lib
from torchmem import cuda as tcuda

CAPTURED = 1
CAPTURE_STREAM = 0x77


@pytest.fixture
def prof():
    with fake_backend_profiler() as p:
        yield p


def test_a_free_during_capture_of_an_older_block_waits_for_the_capture_to_end(prof):
    # cudaFreeAsync of memory the graph did not allocate, on a capturing
    # stream, invalidates the capture: the free must wait until it ends.
    _, old = alloc(4096, 0, CAPTURE_STREAM)
    assert lib.torchmem_cuda_capture_begin(0) == 0
    lib.torchmem_cuda_free(old)
    assert not any(line.startswith("free ") for line in fake_log())
    assert tcuda.plugin_stats(-1)["deferred_frees"] == 1
    [block] = tcuda.live_block_list()
    assert (block["address"], block["deferred"], block["captured"]) == (old, 1, 0)
    # Its memory is still held: not reusable, still counted, still live in the recorder.
    assert tcuda.plugin_stats(0)["current"] == 4096
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 4096
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)
    assert fake_log()[-1] == f"free ptr={old:#x} size=4096 device=0 stream={CAPTURE_STREAM}"
    assert tcuda.plugin_stats(-1)["deferred_frees"] == 0
    assert tcuda.plugin_stats(0)["current"] == 0
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 0
    assert prof.anomalies["total"] == 0


def test_blocks_the_graph_allocated_are_freed_inside_it(prof):
    assert lib.torchmem_cuda_capture_begin(0) == 0
    status, p = alloc(1024, 0, CAPTURE_STREAM, CAPTURED)
    assert status == 0
    [block] = tcuda.live_block_list()
    assert block["captured"] == 1
    lib.torchmem_cuda_free(p)  # a free node of the graph: at once
    assert fake_log()[-1] == f"free ptr={p:#x} size=1024 device=0 stream={CAPTURE_STREAM}"
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)
    assert fake_log() == [
        f"malloc size=1024 device=0 stream={CAPTURE_STREAM} -> ok",
        f"free ptr={p:#x} size=1024 device=0 stream={CAPTURE_STREAM}",
    ]  # the capture stream itself needs no rejoin


def test_streams_freed_on_during_capture_rejoin_the_capture_stream(prof):
    assert lib.torchmem_cuda_capture_begin(0) == 0
    _, p = alloc(256, 0, 0x99, CAPTURED)  # on a side stream the capture forked
    lib.torchmem_cuda_free(p)
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)
    assert fake_log()[-2:] == [
        f"free ptr={p:#x} size=256 device=0 stream={0x99}",
        f"fence device=0 user={0x99} waiter={CAPTURE_STREAM}",
    ]


def test_deferred_frees_run_once_the_last_of_nested_captures_ends(prof):
    _, old = alloc(512, 1, 5)
    assert lib.torchmem_cuda_capture_begin(0) == 0
    assert lib.torchmem_cuda_capture_begin(1) == 0
    lib.torchmem_cuda_free(old)
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)
    assert tcuda.plugin_stats(-1)["deferred_frees"] == 1  # capture on device 1 still runs
    lib.torchmem_cuda_capture_end(1, CAPTURE_STREAM)
    assert tcuda.plugin_stats(-1)["deferred_frees"] == 0
    assert fake_log()[-1] == f"free ptr={old:#x} size=512 device=1 stream=5"


def test_an_allocation_outside_capture_releases_deferred_frees(prof):
    # torch calls endAllocateToPool after cudaStreamEndCapture; should it not
    # (a capture that failed), the next allocation made outside any capture
    # releases what waited.
    _, old = alloc(512, 0, 5)
    assert lib.torchmem_cuda_capture_begin(0) == 0
    lib.torchmem_cuda_free(old)
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)  # count back to 0 ...
    _, p = alloc(64, 0, 5)
    assert tcuda.plugin_stats(-1)["deferred_frees"] == 0
    lib.torchmem_cuda_free(p)


def test_a_captured_allocation_that_fails_is_not_retried(prof):
    # Releasing the cache synchronises the device: forbidden during capture.
    assert lib.torchmem_cuda_capture_begin(0) == 0
    lib.torchmem_fake_fail_next(1)
    status, p = alloc(2048, 0, CAPTURE_STREAM, CAPTURED)
    lib.torchmem_cuda_capture_end(0, CAPTURE_STREAM)
    assert (status, p) == (1, 0)  # out of memory, at once
    assert fake_log() == [f"malloc size=2048 device=0 stream={CAPTURE_STREAM} -> oom"]


def test_a_backend_that_cannot_allocate_during_capture_refuses_it(prof):
    lib.torchmem_fake_set_capture(0)
    assert lib.torchmem_cuda_capture_begin(0) == -1
    assert "refuse capture" in tcuda.last_message()
    _, old = alloc(128, 0, 5)
    lib.torchmem_cuda_free(old)  # no capture began: freed at once
    assert fake_log()[-1].startswith(f"free ptr={old:#x}")
