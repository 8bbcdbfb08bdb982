"""record_stream ordering and the out-of-memory path, against the fake
backend: it logs every call the plugin makes and fails on demand."""

from __future__ import annotations

import ctypes

import pytest

from _cuda_helpers import GiB, UNIFYING, fake_backend_profiler, fake_log, free, malloc, record_stream
from _cuda_helpers import lib as _lib
from torchmem import MemoryEventType, _native
from torchmem import cuda as tcuda


@pytest.fixture
def prof():
    with fake_backend_profiler() as p:
        yield p


def test_free_without_record_stream_has_no_fence(prof):
    p = malloc(1024, 0, 1)
    free(p, 1024, 0, 1)
    assert fake_log() == [
        "malloc size=1024 device=0 stream=1 -> ok",
        f"free ptr={p:#x} size=1024 device=0 stream=1",
    ]


def test_record_stream_frees_on_the_unifying_stream(prof):
    # torch's rule: a block used on several streams is freed on a per-device
    # stream that waits for all of them; no user stream waits on another.
    p = malloc(1024, 0, 1)
    record_stream(p, 7)
    record_stream(p, 9)
    record_stream(p, 7)  # twice: one fence
    record_stream(p, 1)  # the allocation's own stream: nothing to wait for
    free(p, 1024, 0, 1)
    assert fake_log() == [
        "malloc size=1024 device=0 stream=1 -> ok",
        f"create_stream device=0 -> {UNIFYING}",
        f"fence device=0 user=1 waiter={UNIFYING}",
        f"fence device=-1 user=7 waiter={UNIFYING}",
        f"fence device=-1 user=9 waiter={UNIFYING}",
        f"free ptr={p:#x} size=1024 device=0 stream={UNIFYING}",
    ]


def test_record_stream_is_per_block_and_device(prof):
    a = malloc(256, 2, 3)
    b = malloc(256, 2, 3)
    record_stream(b, 4)
    record_stream(0xdead0000, 4)  # unknown block: ignored
    free(a, 256, 2, 3)
    free(b, 256, 2, 3)
    assert fake_log()[2:] == [
        f"free ptr={a:#x} size=256 device=2 stream=3",
        f"create_stream device=2 -> {UNIFYING + 2}",
        f"fence device=2 user=3 waiter={UNIFYING + 2}",
        f"fence device=-1 user=4 waiter={UNIFYING + 2}",
        f"free ptr={b:#x} size=256 device=2 stream={UNIFYING + 2}",
    ]


def test_a_stream_of_another_device_is_fenced_on_its_own_device(prof):
    # The compiled allocator passes the stream's device: the event is
    # recorded with that device current, as cudaEventRecord requires.
    p = malloc(512, 0, 1)
    _lib.torchmem_cuda_record_stream(p, 0x55, 1)
    _lib.torchmem_cuda_free(p)
    assert fake_log()[1:] == [
        f"create_stream device=0 -> {UNIFYING}",
        f"fence device=0 user=1 waiter={UNIFYING}",
        f"fence device=1 user=85 waiter={UNIFYING}",
        f"free ptr={p:#x} size=512 device=0 stream={UNIFYING}",
    ]


def test_a_failed_fence_falls_back_to_a_host_wait(prof):
    p = malloc(512, 0, 1)
    _lib.torchmem_cuda_record_stream(p, 0x55, 1)
    _lib.torchmem_fake_clear()
    _lib.torchmem_fake_fail_fences(1)  # the alloc stream's fence fails
    _lib.torchmem_cuda_free(p)
    assert fake_log() == [
        f"create_stream device=0 -> {UNIFYING}",
        f"fence device=0 user=1 waiter={UNIFYING} -> error",
        "sync device=0 stream=1",
        f"fence device=1 user=85 waiter={UNIFYING}",
        f"free ptr={p:#x} size=512 device=0 stream={UNIFYING}",
    ]
    assert tcuda.plugin_stats(-1)["unfenced_blocks"] == 0


def test_a_free_that_cannot_be_ordered_keeps_the_memory(prof):
    before = tcuda.plugin_stats(-1)["unfenced_blocks"]
    p = malloc(512, 0, 1)
    record_stream(p, 9)
    _lib.torchmem_fake_clear()
    _lib.torchmem_fake_fail_fences(2)
    _lib.torchmem_fake_fail_syncs(2)  # neither stream can even be waited for
    free(p, 512, 0, 1)
    assert fake_log() == [
        f"create_stream device=0 -> {UNIFYING}",
        f"fence device=0 user=1 waiter={UNIFYING} -> error",
        "sync device=0 stream=1 -> error",
        f"fence device=-1 user=9 waiter={UNIFYING} -> error",
        "sync device=-1 stream=9 -> error",
    ]  # and no free: the memory is never handed out again
    assert tcuda.plugin_stats(-1)["unfenced_blocks"] == before + 1
    assert "could not be fenced" in tcuda.last_message()
    # The block is gone for torch and the recorder: its free was recorded.
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 0


def test_oom_releases_the_cache_and_retries_once(prof):
    _lib.torchmem_fake_fail_next(1)
    before = tcuda.plugin_stats(0)
    p = malloc(4096, 0, 5)
    assert p
    assert fake_log() == [
        "malloc size=4096 device=0 stream=5 -> oom",
        "release_cache device=0",
        "malloc size=4096 device=0 stream=5 -> ok",
    ]
    after = tcuda.plugin_stats(0)
    assert after["retry_count"] == before["retry_count"] + 1
    assert after["oom_count"] == before["oom_count"]
    assert prof.oom_events == []
    free(p, 4096, 0, 5)


def test_final_oom_records_the_event_and_returns_null(prof):
    _lib.torchmem_fake_set_mem_info(1 * GiB, 80 * GiB)
    live = malloc(3 * 1024 * 1024, 0, 5)  # 3 MiB live at the failure
    _lib.torchmem_fake_clear()
    _lib.torchmem_fake_fail_next(2)
    before = tcuda.plugin_stats(0)["oom_count"]
    assert malloc(2 * GiB, 0, 5) is None
    assert fake_log() == [
        f"malloc size={2 * GiB} device=0 stream=5 -> oom",
        "release_cache device=0",
        f"malloc size={2 * GiB} device=0 stream=5 -> oom",
    ]
    assert tcuda.plugin_stats(0)["oom_count"] == before + 1
    [oom] = prof.oom_events
    assert {k: getattr(oom, k) for k in ("requested_bytes", "device", "stream", "device_free_bytes",
                                "device_total_bytes", "live_bytes")} == {
        "requested_bytes": 2 * GiB, "device": 0, "stream": 5,
        "device_free_bytes": 1 * GiB, "device_total_bytes": 80 * GiB,
        "live_bytes": 3 * 1024 * 1024}
    [ev] = [e for e in prof.get_events() if e.event_type == MemoryEventType.OUT_OF_MEMORY]
    assert (ev.size_bytes, ev.device, ev.stream, ev.allocation_type) == (2 * GiB, 0, 5, "GPU")
    msg = tcuda.last_oom_message()
    # torch's format_size prints exactly 1 GiB as "1024.00 MiB"; so do we.
    assert msg.startswith("CUDA out of memory. Tried to allocate 2.00 GiB on device 0. "
                          "GPU 0 has a total capacity of 80.00 GiB of which 1024.00 MiB is free. "
                          "Of the allocated memory 3.00 MiB is allocated by PyTorch "
                          "(torchmem plugin, 1 live blocks).")
    free(live, 3 * 1024 * 1024, 0, 5)


def test_memory_fraction_limits_without_asking_the_backend(prof):
    _lib.torchmem_fake_set_mem_info(800_000, 1_000_000)
    _lib.torchmem_set_memory_fraction(0.5, 1)
    a = malloc(400_000, 1, 0)
    assert a
    assert malloc(200_000, 1, 0) is None  # 600 000 > 500 000
    assert fake_log() == ["malloc size=400000 device=1 stream=0 -> ok"]
    assert "set_per_process_memory_fraction is 488.28 KiB" in tcuda.last_oom_message()
    assert prof.oom_events[0].requested_bytes == 200_000
    _lib.torchmem_set_memory_fraction(1.0, 1)
    b = malloc(200_000, 1, 0)
    assert b
    free(a, 400_000, 1, 0)
    free(b, 200_000, 1, 0)


def test_empty_cache_releases_every_used_device(prof):
    p = malloc(64, 3, 0)
    free(p, 64, 3, 0)
    _lib.torchmem_fake_clear()
    tcuda.empty_cache()
    log = fake_log()
    assert "release_cache device=3" in log
    assert all(line.startswith("release_cache device=") for line in log)


def test_oom_raises_through_cpp_callers_like_torch(prof):
    # torch calls the plugin from C++: there the OOM is an exception with
    # torch's wording, which torch hands to Python as RuntimeError.
    tcuda._set_oom_throws(True)
    try:
        _lib.torchmem_fake_fail_next(2)
        with pytest.raises(RuntimeError, match=r"^CUDA out of memory\. Tried to allocate "
                                               r"1\.50 GiB on device 0\."):
            _native.cuda_test_malloc(3 * GiB // 2, 0, 0)
        assert prof.oom_events[-1].requested_bytes == 3 * GiB // 2
    finally:
        tcuda._set_oom_throws(False)


def test_fake_addresses_are_distinct(prof):
    ptrs = [malloc(16, 0, 0) for _ in range(100)]
    assert len(set(ptrs)) == 100
    for p in ptrs:
        free(p, 16, 0, 0)
    assert ctypes.c_void_p(ptrs[0]).value == ptrs[0]
