"""How torchmem decides where GPU events come from, and the plugin's Python
surface on a machine without CUDA."""

from __future__ import annotations

import pytest

import torchmem
from torchmem import cuda as tcuda
from torchmem.cuda import choose_gpu_source


@pytest.mark.parametrize(
    "available, initialized, user, installed, expected",
    [
        (True, False, None, False, ("plugin", False)),
        (True, False, "auto", False, ("plugin", False)),
        (True, False, "plugin", False, ("plugin", False)),
        (True, True, None, False, ("history", True)),
        (True, True, "plugin", False, ("history", True)),
        (True, True, "history", False, ("history", False)),
        (True, False, "history", False, ("history", False)),
        (True, True, None, True, ("plugin", False)),  # swapped earlier in this process
        (True, True, "history", True, ("plugin", False)),
        (True, False, "none", False, ("none", False)),
        (False, False, None, False, ("none", False)),
        (False, False, "plugin", False, ("none", False)),
        (False, False, "history", False, ("none", False)),
    ],
)
def test_choice_table(available, initialized, user, installed, expected):
    choice = choose_gpu_source(available, initialized, user, installed)
    assert (choice.source, choice.fallback) == expected
    assert choice.message


def test_fallback_message_says_why_and_what_to_do():
    choice = choose_gpu_source(True, True)
    assert "already initialised" in choice.message
    assert "history" in choice.message
    assert "before any CUDA work" in choice.message


def test_no_cuda_message():
    assert choose_gpu_source(False, False).message == (
        "CUDA is not available: no GPU allocations to record.")


def test_bad_choice_is_rejected():
    with pytest.raises(ValueError, match="gpu_source"):
        choose_gpu_source(True, False, "gpu")


def test_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        tcuda.set_backend("cudaMalloc")
    assert tcuda.BACKENDS == ("async", "sync", "host", "fake")


def test_memory_stats_dict_has_torch_keys():
    stats = {"current": 10, "peak": 20, "allocated": 30, "freed": 20, "alloc_count": 3,
             "free_count": 2, "oom_count": 1, "retry_count": 4, "reserved": 64,
             "reserved_peak": 128, "live_blocks": 1, "unknown_frees": 0}
    d = tcuda.memory_stats_dict(stats)
    assert d["allocated_bytes.all.current"] == 10
    assert d["allocated_bytes.all.peak"] == 20
    assert d["allocated_bytes.all.allocated"] == 30
    assert d["allocated_bytes.all.freed"] == 20
    assert d["reserved_bytes.all.current"] == 64
    assert d["reserved_bytes.all.peak"] == 128
    assert d["allocation.all.current"] == 1
    assert d["num_ooms"] == 1 and d["num_alloc_retries"] == 4
    assert d["allocated_bytes.large_pool.current"] == 0
    assert all(isinstance(v, int) for v in d.values())


torch = pytest.importorskip("torch")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only behaviour")
def test_without_cuda_nothing_is_installed():
    assert tcuda.install_allocator() is False
    assert not tcuda.is_installed()
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    rec = tcuda.start_gpu_recording(p)
    assert rec.choice.source == "none" and rec.history is None
    p.close()


def test_runtime_description_is_text():
    assert isinstance(tcuda.runtime_description(), str)


def test_patched_torch_stats_answer_from_plugin_counters():
    import types

    def raises(*a, **k):
        raise RuntimeError("CUDAPluggableAllocator does not yet support getDeviceStats")

    names = ("memory_stats", "memory_allocated", "max_memory_allocated", "memory_reserved",
             "max_memory_reserved", "reset_peak_memory_stats")
    memory = types.SimpleNamespace(**{n: raises for n in names},
                                   _get_device_index=lambda d, optional=True: 0 if d is None else d)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(memory=memory,
                                                                  **{n: getattr(memory, n) for n in names}))
    tcuda._patch_torch_stats(fake_torch)
    tcuda.set_backend("host")
    tcuda._set_oom_throws(False)
    lib = tcuda._clib()
    tcuda.reset_peak(5)
    base = tcuda.plugin_stats(5)["current"]
    a = lib.torchmem_malloc(1000, 5, None)
    b = lib.torchmem_malloc(3000, 5, None)
    lib.torchmem_free(a, 1000, 5, None)
    for ns in (memory, fake_torch.cuda):
        assert ns.memory_allocated(5) == base + 3000
        assert ns.max_memory_allocated(5) == base + 4000
        assert ns.memory_reserved(5) == base + 3000
        assert ns.memory_stats(5)["allocated_bytes.all.peak"] == base + 4000
    fake_torch.cuda.reset_peak_memory_stats(5)
    assert memory.max_memory_allocated(5) == base + 3000
    assert memory.memory_allocated() == tcuda.plugin_stats(0)["current"]  # None -> device 0
    lib.torchmem_free(b, 3000, 5, None)


def test_history_that_cannot_start_degrades_to_none(monkeypatch):
    import torchmem.sources.cuda_history as ch

    def boom(self):
        raise RuntimeError("no history in this torch")

    monkeypatch.setattr(ch.CudaHistorySource, "start", boom)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with pytest.warns(RuntimeWarning, match="could not be started"):
        rec = tcuda.start_gpu_recording(p, "history")
    assert rec.choice.source == "none" and rec.history is None
    p.close()


def test_history_chosen_when_cuda_was_initialised(monkeypatch):
    import torchmem.sources.cuda_history as ch

    started = []
    monkeypatch.setattr(ch.CudaHistorySource, "start", lambda self: started.append(self) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with pytest.warns(RuntimeWarning, match="already initialised"):
        rec = tcuda.start_gpu_recording(p)
    assert (rec.choice.source, rec.choice.fallback) == ("history", True)
    assert started == [rec.history] and rec.history.profiler is p
    p.close()
