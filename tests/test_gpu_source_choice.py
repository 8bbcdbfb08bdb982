"""How torchmem decides where GPU events come from, and the plugin's Python
surface on a machine without CUDA."""

from __future__ import annotations

import pytest

import torchmem
from torchmem import cuda as tcuda
from torchmem.cuda import choose_gpu_source


@pytest.mark.parametrize(
    "available, initialized, user, installed, tracker, expected",
    [
        # The default: torch's own allocator, traced, whether or not CUDA is initialised.
        (True, False, None, False, True, ("tracker", False)),
        (True, False, "auto", False, True, ("tracker", False)),
        (True, True, None, False, True, ("tracker", False)),
        (True, True, "tracker", False, True, ("tracker", False)),
        # No compiler or headers: the batched history, with a warning.
        (True, False, None, False, False, ("history", True)),
        (True, True, "tracker", False, False, ("history", True)),
        # The plugin on request, before CUDA is initialised only.
        (True, False, "plugin", False, True, ("plugin", False)),
        (True, False, "plugin", False, False, ("plugin", False)),
        (True, True, "plugin", False, True, ("tracker", True)),
        (True, True, "plugin", False, False, ("history", True)),
        (True, True, "history", False, True, ("history", False)),
        (True, False, "history", False, True, ("history", False)),
        (True, True, None, True, True, ("plugin", False)),  # swapped earlier in this process
        (True, True, "history", True, True, ("plugin", False)),
        (True, False, "none", False, True, ("none", False)),
        (False, False, None, False, True, ("none", False)),
        (False, False, "plugin", False, True, ("none", False)),
        (False, False, "tracker", False, True, ("none", False)),
    ],
)
def test_choice_table(available, initialized, user, installed, tracker, expected):
    choice = choose_gpu_source(available, initialized, user, installed, tracker)
    assert (choice.source, choice.fallback) == expected
    assert choice.message


def test_plugin_after_cuda_init_says_why_and_what_to_do():
    choice = choose_gpu_source(True, True, "plugin")
    assert "already initialised" in choice.message
    assert "trace tracker" in choice.message
    assert "before any CUDA work" in choice.message


def test_no_tracker_says_why():
    choice = choose_gpu_source(True, False, None, tracker_available=False,
                               tracker_reason="no C++ compiler found")
    assert choice.source == "history"
    assert "no C++ compiler found" in choice.message


def test_no_cuda_message():
    assert choose_gpu_source(False, False).message == (
        "CUDA is not available: no GPU allocations to record.")


def test_bad_choice_is_rejected():
    with pytest.raises(ValueError, match="gpu_source"):
        choose_gpu_source(True, False, "gpu")
    assert tcuda.GPU_SOURCES == ("auto", "tracker", "plugin", "history", "none")


def test_backend_names():
    with pytest.raises(ValueError, match="backend must be one of"):
        tcuda.set_backend("cudaMalloc")
    assert tcuda.BACKENDS == ("async", "sync", "host", "fake")


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


def test_history_chosen_when_the_tracker_cannot_be_built(monkeypatch):
    import torchmem.sources.cuda_history as ch

    started = []
    monkeypatch.setattr(ch.CudaHistorySource, "start", lambda self: started.append(self) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with pytest.warns(RuntimeWarning, match="trace tracker cannot be built"):
        rec = tcuda.start_gpu_recording(p)
    assert (rec.choice.source, rec.choice.fallback) == ("history", True)
    assert started == [rec.history] and rec.history.profiler is p
    assert rec.source_object is rec.history
    p.close()


def test_tracker_chosen_by_default(monkeypatch):
    import torchmem.sources.cuda_tracker as ctr

    started = []
    monkeypatch.setattr(tcuda, "_tracker_status", lambda: (True, ""))
    monkeypatch.setattr(ctr.CudaTraceTracker, "start",
                        lambda self: started.append(self) or self)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    rec = tcuda.start_gpu_recording(p)
    assert (rec.choice.source, rec.choice.fallback) == ("tracker", False)
    assert started == [rec.tracker] and rec.tracker.profiler is p and rec.tracker.stacks
    assert rec.source_object is rec.tracker and rec.history is None
    p.close()


def test_tracker_on_a_cpu_build_of_torch_says_why():
    from torchmem.sources.cuda_hook import CudaHookUnavailable, load_cuda_hook

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch")
    with pytest.raises(CudaHookUnavailable, match="CPU-only build"):
        load_cuda_hook()


def test_the_fallback_says_what_does_not_work(monkeypatch):
    from torchmem.sources._build import BuildUnavailable

    def no_class():
        raise BuildUnavailable("no C++ compiler found")

    installed = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(tcuda, "_install_class", no_class)
    monkeypatch.setattr(tcuda, "_install_functions", lambda t: installed.append(t))
    monkeypatch.setattr(tcuda, "_start_backend", lambda name: None)
    monkeypatch.setattr(tcuda, "_set_oom_throws", lambda on: None)
    monkeypatch.setattr(tcuda, "_installed", None)
    monkeypatch.setattr(tcuda, "_backend_choice", None)  # other tests chose "host"
    monkeypatch.delenv("TORCHMEM_CUDA_BACKEND", raising=False)
    with pytest.warns(RuntimeWarning) as caught:
        assert tcuda.install_allocator() is True
    text = str(caught[0].message)
    assert "no C++ compiler found" in text
    for limit in tcuda.FALLBACK_LIMITS:
        assert limit in text
    assert "torch.OutOfMemoryError" in text and "cudnn.benchmark" in text
    assert tcuda.installed_kind() == "functions" and installed == [torch]


def test_a_missing_hook_setter_refuses_the_c_function_plugin():
    import types

    class Hooks:  # a torch whose CUDAPluggableAllocator cannot take record_stream
        def __init__(self):
            self.set = []

        def __getattr__(self, name):
            if name == "set_record_stream_fn":
                raise AttributeError(name)
            return lambda address: self.set.append(name)

    hooks = Hooks()
    changed = []
    memory = types.SimpleNamespace(
        CUDAPluggableAllocator=lambda path, alloc, free: types.SimpleNamespace(
            allocator=lambda: hooks),
        change_current_allocator=changed.append)
    fake_torch = types.SimpleNamespace(cuda=types.SimpleNamespace(memory=memory))
    with pytest.raises(RuntimeError, match="set_record_stream_fn"):
        tcuda._install_functions(fake_torch)
    assert hooks.set == [] and changed == []  # nothing half-installed
