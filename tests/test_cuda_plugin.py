"""The CUDA plugin's entry points driven as torch drives them: C function
pointers to torchmem_malloc / torchmem_free in the module's shared library,
with the host backend (malloc / free), so it all runs without a GPU."""

from __future__ import annotations

import ctypes
import inspect
import subprocess
import sys
import threading

import pytest

import torchmem
from torchmem import MemoryEventType, _native
from torchmem import cuda as tcuda

MALLOC_T = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
FREE_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)
RECORD_STREAM_T = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)
BASE_ALLOC_T = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t))

# What torch's CUDAPluggableAllocator does: look the symbols up by name in the
# library at plugin_path() and call them through plain function pointers.
_lib = ctypes.CDLL(tcuda.plugin_path())
malloc = MALLOC_T(ctypes.cast(_lib.torchmem_malloc, ctypes.c_void_p).value)
free = FREE_T(ctypes.cast(_lib.torchmem_free, ctypes.c_void_p).value)
record_stream = RECORD_STREAM_T(ctypes.cast(_lib.torchmem_record_stream, ctypes.c_void_p).value)
base_alloc = BASE_ALLOC_T(ctypes.cast(_lib.torchmem_base_alloc, ctypes.c_void_p).value)


def detach_recorder():
    """No recorder for the plugin (a disabled one where None is not accepted)."""
    try:
        _native.set_gpu_recorder(None)
    except TypeError:
        idle = _native.Recorder(1024)
        idle.enabled = False
        _native.set_gpu_recorder(idle)


def _gpu_stats(prof):
    s = prof.get_statistics_for_type("GPU")
    return (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes,
            s.peak_usage_bytes, s.allocation_count, s.deallocation_count)


@pytest.fixture
def prof():
    tcuda.set_backend("host")
    tcuda._set_oom_throws(False)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    _native.set_gpu_recorder(p)
    _native.set_stack_capture(False, 10)
    tcuda.reset_peak(-1)
    try:
        yield p
    finally:
        detach_recorder()
        _native.set_stack_capture(False, 10)
        assert tcuda.live_blocks() == 0, "a test left plugin blocks live"


def test_plugin_path_exports_the_entry_points():
    assert tcuda.plugin_path() == _native.__file__
    for name in ("torchmem_malloc", "torchmem_free", "torchmem_init", "torchmem_reset",
                 "torchmem_set_memory_fraction", "torchmem_base_alloc",
                 "torchmem_record_stream"):
        assert getattr(_lib, name) is not None


def test_one_allocation_reaches_the_profiler_as_a_gpu_event(prof):
    before = tcuda.plugin_stats(3)
    p = malloc(4096, 3, 0x77)
    assert p
    ctypes.memset(p, 0, 4096)  # host backend: real memory
    events = prof.get_events()
    assert [(e.event_type, e.address, e.size_bytes, e.allocation_type, e.device, e.stream)
            for e in events] == [(MemoryEventType.ALLOCATION, p, 4096, "GPU", 3, 0x77)]
    assert _gpu_stats(prof) == (4096, 0, 4096, 4096, 1, 0)
    free(p, 4096, 3, 0x77)
    events = prof.get_events()
    assert [(e.event_type, e.address, e.size_bytes, e.device, e.stream) for e in events[1:]] == [
        (MemoryEventType.DEALLOCATION, p, 4096, 3, 0x77)]
    assert events[1].total_allocated_bytes == 4096 and events[1].total_freed_bytes == 4096
    assert _gpu_stats(prof) == (4096, 4096, 0, 4096, 1, 1)
    after = tcuda.plugin_stats(3)
    assert after["allocated"] - before["allocated"] == 4096
    assert after["freed"] - before["freed"] == 4096
    assert after["alloc_count"] - before["alloc_count"] == 1
    assert after["current"] == 0 and after["live_blocks"] == 0


def test_zero_bytes_and_null_free_record_nothing(prof):
    before = tcuda.plugin_stats()
    assert malloc(0, 0, None) is None
    free(None, 0, 0, None)
    assert prof.get_events() == []
    assert tcuda.plugin_stats() == before  # a null free is not an unknown free


def test_the_plugin_map_decides_the_size(prof):
    p = malloc(1000, 0, None)
    free(p, 24, 0, None)  # a caller that passes the wrong size
    assert _gpu_stats(prof) == (1000, 1000, 0, 1000, 1, 1)
    assert prof.anomalies["counts"]["size_mismatch"] == 1
    q = malloc(512, 0, None)
    free(q, 0, 0, None)  # no size at all
    assert _gpu_stats(prof)[1] == 1512
    assert prof.anomalies["counts"]["size_mismatch"] == 1


def test_unknown_pointer_is_reported_not_freed(prof):
    before = tcuda.plugin_stats(-1)["unknown_frees"]
    free(0x1234560, 64, 0, None)  # would crash a real free()
    assert tcuda.plugin_stats(-1)["unknown_frees"] == before + 1
    assert prof.anomalies["counts"]["unknown_free"] == 1
    assert _gpu_stats(prof) == (0, 0, 0, 0, 0, 0)


def test_peak_and_reset_peak(prof):
    a = malloc(300, 0, None)
    b = malloc(700, 0, None)
    free(a, 300, 0, None)
    assert tcuda.plugin_stats(0)["peak"] == 1000
    assert tcuda.plugin_stats(0)["current"] == 700
    tcuda.reset_peak(0)
    assert tcuda.plugin_stats(0)["peak"] == 700
    c = malloc(100, 0, None)
    assert tcuda.plugin_stats(0)["peak"] == 800
    free(b, 700, 0, None)
    free(c, 100, 0, None)
    assert tcuda.plugin_stats(0)["reserved"] == 0  # host: reserved == current


def test_disabled_profiler_records_nothing_but_plugin_counts(prof):
    prof.disable()
    before = tcuda.plugin_stats(0)["alloc_count"]
    p = malloc(64, 0, None)
    free(p, 64, 0, None)
    assert prof.get_events() == []
    assert tcuda.plugin_stats(0)["alloc_count"] == before + 1
    prof.enable()


def test_no_recorder_still_allocates(prof):
    detach_recorder()
    p = malloc(128, 0, None)
    assert p
    free(p, 128, 0, None)
    assert prof.get_events() == []


def test_base_alloc_reports_the_block(prof):
    p = malloc(2048, 0, None)
    size = ctypes.c_size_t(0)
    assert base_alloc(p, ctypes.byref(size)) == p
    assert size.value == 2048
    free(p, 2048, 0, None)


def test_stack_of_the_python_caller_is_captured(prof):
    # ctypes drops the GIL around the call, as torch's op bindings do; the
    # plugin takes it back to read the calling thread's Python stack.
    _native.set_stack_capture(True, 10)
    line = inspect.currentframe().f_lineno + 1
    p = malloc(96, 0, None)
    free(p, 96, 0, None)
    ev = prof.get_events()[0]
    assert ev.stack_trace is not None
    assert ev.stack_trace.frames[0] == (__file__, line, "test_stack_of_the_python_caller_is_captured")


NO_GIL_SCRIPT = """
import ctypes, torchmem
from torchmem import _native, cuda as tcuda
tcuda.set_backend("host")
prof = torchmem.MemoryProfiler(auto_snapshot=False)
_native.set_gpu_recorder(prof)
_native.set_stack_capture(True, 10)
lib = ctypes.CDLL(tcuda.plugin_path())
tid = ctypes.c_ulong(0)
start = ctypes.cast(lib.torchmem_plugin_bench, ctypes.c_void_p)
assert ctypes.CDLL(None).pthread_create(ctypes.byref(tid), None, start, ctypes.c_void_p(500)) == 0
# PyDLL keeps the GIL held during the join: a plugin that tried to take the
# GIL on the raw thread would deadlock here.
assert ctypes.PyDLL(None).pthread_join(tid, None) == 0
events = prof.get_events()
assert len(events) == 1000 and all(e.stack_trace is None for e in events)
print("OK")
"""


def test_thread_without_python_gets_no_stack_and_no_gil():
    # A thread that never ran Python (like autograd's device threads) has no
    # Python frames: the plugin must not take the GIL there.
    proc = subprocess.run([sys.executable, "-c", NO_GIL_SCRIPT], capture_output=True,
                          text=True, timeout=60)
    assert proc.stdout.strip() == "OK", proc.stderr


def test_many_threads_at_once_exact_counters(prof):
    threads, pairs, keep = 4, 20000, 10
    sizes = [64 * (1 + (i % 16)) for i in range(pairs)]
    kept: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)
    before = {d: tcuda.plugin_stats(d) for d in (0, 1)}

    def work(t: int) -> None:
        device, stream = t % 2, 100 + t
        barrier.wait()
        for i, size in enumerate(sizes):
            p = malloc(size, device, stream)
            if i >= pairs - keep:
                kept[t].append((p, size, device))
            else:
                free(p, size, device, stream)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in ts:
        th.start()
    for th in ts:
        th.join()
    total = threads * sum(sizes)
    live = threads * sum(sizes[-keep:])
    s = prof.get_statistics_for_type("GPU")
    assert (s.total_allocated_bytes, s.allocation_count) == (total, threads * pairs)
    assert (s.current_usage_bytes, s.deallocation_count) == (live, threads * (pairs - keep))
    assert prof.anomalies["total"] == 0
    for d in (0, 1):
        now = tcuda.plugin_stats(d)
        assert now["allocated"] - before[d]["allocated"] == total // 2
        assert now["alloc_count"] - before[d]["alloc_count"] == threads * pairs // 2
        assert now["current"] == live // 2
        assert now["live_blocks"] == threads * keep // 2
    assert len(prof.get_events()) == threads * (2 * pairs - keep)
    for blocks in kept:
        for p, size, device in blocks:
            free(p, size, device, 0)
    assert prof.get_statistics_for_type("GPU").current_usage_bytes == 0


def test_backend_switch_refused_while_blocks_live(prof):
    p = malloc(64, 0, None)
    with pytest.raises(RuntimeError, match="still live"):
        tcuda.set_backend("fake")
    free(p, 64, 0, None)
    tcuda.set_backend("fake")
    tcuda.set_backend("host")
    assert tcuda.backend() == "host"
    with pytest.raises(ValueError):
        tcuda.set_backend("cuda")


def test_native_benchmark_loop(prof):
    ns = tcuda._clib().torchmem_plugin_bench(1000)
    assert ns > 0
    assert _gpu_stats(prof)[4:] == (1000, 1000)


def test_bindings_agree_with_the_c_interface(prof):
    p = _native.cuda_test_malloc(256, 2, 5)
    assert _native.cuda_plugin_stats(2) == tcuda.plugin_stats(2)
    assert _native.cuda_backend() == "host"
    addrs = _native.cuda_hook_addresses()
    assert addrs["malloc"] == ctypes.cast(_lib.torchmem_malloc, ctypes.c_void_p).value
    _native.cuda_test_free(p, 256, 2, 5)
    assert _gpu_stats(prof) == (256, 256, 0, 256, 1, 1)
