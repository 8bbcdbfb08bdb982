"""What torch's memory statistics, cacheInfo, snapshot() and peer access
get from the plugin (through the compiled allocator class, or the Python
patch of the C-function fallback), exact, on the fake backend."""

from __future__ import annotations

import ctypes
import types

import pytest

from _cuda_helpers import alloc, fake_backend_profiler, fake_log, lib
from torchmem import cuda as tcuda
from torchmem.sources import cuda_stats


@pytest.fixture
def prof():
    with fake_backend_profiler() as p:
        yield p


def test_counters_have_every_field(prof):
    assert tuple(tcuda.plugin_stats(0)) == tcuda.STAT_NAMES
    assert len(tcuda.STAT_NAMES) == 16


def test_peak_block_count_is_the_most_blocks_live_at_once(prof):
    tcuda.reset_peak(3)
    ptrs = [alloc(100, 3, 1)[1] for _ in range(5)]
    for p in ptrs[:4]:
        lib.torchmem_cuda_free(p)
    s = tcuda.plugin_stats(3)
    assert (s["live_blocks"], s["peak_live_blocks"]) == (1, 5)
    assert (s["current"], s["peak"]) == (100, 500)
    tcuda.reset_peak(3)
    assert tcuda.plugin_stats(3)["peak_live_blocks"] == 1
    d = cuda_stats.memory_stats_dict(tcuda.plugin_stats(3))
    assert (d["allocation.all.current"], d["allocation.all.peak"]) == (1, 1)
    lib.torchmem_cuda_free(ptrs[4])


def test_reset_accumulated_zeroes_the_cumulative_counters_only(prof):
    _, keep = alloc(300, 2, 1)
    _, gone = alloc(200, 2, 1)
    lib.torchmem_cuda_free(gone)
    lib.torchmem_fake_fail_next(1)
    _, retried = alloc(50, 2, 1)  # one retry after a cache release
    tcuda.reset_accumulated(2)
    s = tcuda.plugin_stats(2)
    assert (s["allocated"], s["freed"], s["alloc_count"], s["free_count"], s["retry_count"]) == (
        0, 0, 0, 0, 0)
    assert (s["current"], s["live_blocks"]) == (350, 2)  # what is live stays
    lib.torchmem_cuda_free(keep)
    s = tcuda.plugin_stats(2)
    assert (s["freed"], s["free_count"], s["current"]) == (300, 1, 50)
    lib.torchmem_cuda_free(retried)


def test_memory_stats_dict_is_sorted_with_exact_values(prof):
    stats = {"current": 10, "peak": 20, "allocated": 30, "freed": 20, "alloc_count": 3,
             "free_count": 2, "oom_count": 1, "retry_count": 4, "reserved": 64,
             "reserved_peak": 128, "live_blocks": 1, "unknown_frees": 0,
             "peak_live_blocks": 2, "deferred_frees": 0, "unfenced_blocks": 0, "limit": 0}
    d = cuda_stats.memory_stats_dict(stats)
    assert list(d) == sorted(d)
    assert {k: d[k] for k in ("allocated_bytes.all.current", "allocated_bytes.all.peak",
                              "requested_bytes.all.allocated", "reserved_bytes.all.peak",
                              "allocation.all.current", "allocation.all.peak",
                              "allocation.all.allocated", "active.all.freed", "num_ooms",
                              "num_alloc_retries", "num_device_alloc", "max_split_size")} == {
        "allocated_bytes.all.current": 10, "allocated_bytes.all.peak": 20,
        "requested_bytes.all.allocated": 30, "reserved_bytes.all.peak": 128,
        "allocation.all.current": 1, "allocation.all.peak": 2, "allocation.all.allocated": 3,
        "active.all.freed": 2, "num_ooms": 1, "num_alloc_retries": 4, "num_device_alloc": 3,
        "max_split_size": -1}
    # The prefixes torch.cuda.memory_summary reads, for all three pools.
    for metric in ("allocated_bytes", "reserved_bytes", "active_bytes", "requested_bytes",
                   "inactive_split_bytes", "allocation", "segment", "active", "inactive_split"):
        for pool in ("all", "large_pool", "small_pool"):
            for key in ("current", "peak", "allocated", "freed"):
                assert f"{metric}.{pool}.{key}" in d


def _fake_torch(initialized: bool):
    """A torch namespace whose stats raise as under CUDAPluggableAllocator, and whose
    current_device fails the test if called before CUDA is initialised."""
    names = ("memory_stats", "memory_allocated", "max_memory_allocated", "memory_reserved",
             "max_memory_reserved", "reset_peak_memory_stats", "reset_accumulated_memory_stats",
             "get_per_process_memory_fraction")

    def raises(*a, **k):
        raise RuntimeError("CUDAPluggableAllocator does not yet support getDeviceStats")

    def current_device():
        if not initialized:
            raise AssertionError("current_device() called without CUDA initialised")
        return 2

    memory = types.SimpleNamespace(**{n: raises for n in names},
                                   _get_device_index=lambda d, optional=True: int(d))
    cuda = types.SimpleNamespace(memory=memory, is_initialized=lambda: initialized,
                                 current_device=current_device,
                                 **{n: getattr(memory, n) for n in names})
    return types.SimpleNamespace(cuda=cuda)


def test_patched_functions_answer_from_plugin_counters(prof):
    torch = _fake_torch(initialized=False)
    tcuda._patch_torch_stats(torch)
    try:
        tcuda.reset_peak(0)
        base = tcuda.plugin_stats(0)["current"]
        _, a = alloc(1000, 0, 1)
        _, b = alloc(3000, 0, 1)
        lib.torchmem_cuda_free(a)
        for ns in (torch.cuda.memory, torch.cuda):
            assert ns.memory_allocated() == base + 3000  # None: device 0, no CUDA init
            assert ns.max_memory_allocated(0) == base + 4000
            assert ns.memory_reserved(0) == base + 3000
            stats = ns.memory_stats()
            assert list(stats) == sorted(stats)
            assert stats["allocated_bytes.all.peak"] == base + 4000
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == base + 3000
        torch.cuda.reset_accumulated_memory_stats()
        assert torch.cuda.memory_stats()["allocation.all.allocated"] == 0
        lib.torchmem_fake_set_mem_info(1000, 4000)
        lib.torchmem_set_memory_fraction(0.25, 0)
        assert torch.cuda.get_per_process_memory_fraction() == 0.25
        assert torch.cuda.memory.get_per_process_memory_fraction(0) == 0.25
        lib.torchmem_cuda_free(b)
    finally:
        cuda_stats.restore_torch_stats()


def test_patched_functions_use_the_current_device_once_cuda_is_initialised(prof):
    torch = _fake_torch(initialized=True)
    tcuda._patch_torch_stats(torch)
    try:
        _, p = alloc(700, 2, 1)
        assert torch.cuda.memory_allocated() == tcuda.plugin_stats(2)["current"]
        lib.torchmem_cuda_free(p)
    finally:
        cuda_stats.restore_torch_stats()


def test_cache_info_is_what_one_allocation_could_get(prof):
    # cuDNN's benchmark mode sizes its workspace with cacheInfo.
    lib.torchmem_fake_set_mem_info(800_000, 1_000_000)
    assert tcuda.largest_free_block(1) == 800_000
    lib.torchmem_set_memory_fraction(0.5, 1)  # 500 000 allowed
    _, p = alloc(100_000, 1, 0)
    assert tcuda.largest_free_block(1) == 400_000  # the limit binds, not the device
    assert tcuda.memory_fraction(1) == 0.5
    lib.torchmem_cuda_free(p)
    lib.torchmem_set_memory_fraction(1.0, 1)
    assert tcuda.memory_fraction(1) == 1.0


def test_snapshot_lists_every_live_block_by_address(prof):
    made = [alloc(size, dev, stream)[1] for size, dev, stream in
            ((4096, 0, 11), (100, 1, 12), (2 << 20, 0, 13))]
    blocks = tcuda.live_block_list()
    assert blocks == sorted(
        ({"address": p, "size": size, "stream": stream, "device": dev, "captured": 0,
          "deferred": 0}
         for p, (size, dev, stream) in zip(made, ((4096, 0, 11), (100, 1, 12), (2 << 20, 0, 13)))),
        key=lambda b: b["address"])
    for p in made:
        lib.torchmem_cuda_free(p)
    assert tcuda.live_block_list() == []


def test_base_allocation_of_an_unknown_pointer_has_size_zero(prof):
    size = ctypes.c_size_t(12345)
    assert lib.torchmem_base_alloc(0xabc000, ctypes.byref(size)) == 0xabc000
    assert size.value == 0
    _, p = alloc(640, 0, 0)
    assert lib.torchmem_base_alloc(p, ctypes.byref(size)) == p and size.value == 640
    lib.torchmem_cuda_free(p)


def test_peer_access_reaches_the_backend(prof):
    assert lib.torchmem_cuda_enable_peer_access(0, 1) == 0
    assert fake_log() == ["peer_access device=0 peer=1"]


def test_out_of_memory_is_a_status_with_torchs_message(prof):
    lib.torchmem_fake_set_mem_info(1 << 30, 80 << 30)
    lib.torchmem_fake_fail_next(2)
    status, p = alloc(3 << 29, 0, 4)
    assert (status, p) == (1, 0)
    assert tcuda.last_message().startswith(
        "CUDA out of memory. Tried to allocate 1.50 GiB on device 0. GPU 0 has a total "
        "capacity of 80.00 GiB of which 1024.00 MiB is free.")
    assert prof.oom_events[-1].requested_bytes == 3 << 29
    free_b, total_b = ctypes.c_uint64(), ctypes.c_uint64()
    assert lib.torchmem_cuda_mem_info(0, ctypes.byref(free_b), ctypes.byref(total_b)) == 0
    assert (free_b.value, total_b.value) == (1 << 30, 80 << 30)
