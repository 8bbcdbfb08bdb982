"""The CPU allocator hook against independent measures of live CPU memory."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

from torchmem import MemoryProfiler
from torchmem.sources import cpu_allocator
from torchmem.sources.cpu_allocator import CPUAllocatorHook, HookUnavailable, build_hook

from _host_helpers import check_mlp_adam


@pytest.fixture
def prof():
    p = MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()


def cpu(p: MemoryProfiler):
    return p.get_statistics_for_type("CPU")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=300)


@pytest.mark.parametrize("variant", ["foreach", "fused"])
def test_mlp_adam_exact_at_every_step(prof, variant):
    # The hook sees what torch.profiler sees, temporaries inside ops too.
    check_mlp_adam(prof, CPUAllocatorHook(prof), variant, peak_shortfall=0)
    assert cpu(prof).current_usage_bytes == 0
    assert prof.detect_potential_leaks() == []
    assert prof.anomalies["total"] == 0


def test_every_thread_is_seen(prof):
    held = []
    with CPUAllocatorHook(prof):
        worker = threading.Thread(target=lambda: held.append(torch.empty(1000, dtype=torch.uint8)))
        worker.start()
        worker.join()
        assert cpu(prof).current_usage_bytes == 1000
        held.clear()
    assert cpu(prof).current_usage_bytes == 0
    assert prof.anomalies["total"] == 0


def test_resize_frees_the_old_block(prof):
    with CPUAllocatorHook(prof):
        t = torch.empty(100, dtype=torch.uint8)
        t.resize_(5000)
        s = cpu(prof)
        assert (s.current_usage_bytes, s.allocation_count, s.deallocation_count) == (5000, 2, 1)
        del t
    s = cpu(prof)
    assert (s.current_usage_bytes, s.total_allocated_bytes, s.total_freed_bytes) == (0, 5100, 5100)
    assert prof.anomalies["total"] == 0


def test_stop_records_no_new_blocks_but_keeps_reporting_frees(prof):
    hook = CPUAllocatorHook(prof).start()
    kept = torch.empty(300, dtype=torch.uint8)
    hook.stop()
    assert not hook.active and cpu_allocator.load_hook().torchmem_cpu_hook_active() == 0
    later = torch.empty(700, dtype=torch.uint8)
    assert cpu(prof).current_usage_bytes == 300
    del kept, later
    assert cpu(prof).current_usage_bytes == 0
    assert prof.anomalies["total"] == 0


def test_disabled_profiler_is_not_fed(prof):
    with CPUAllocatorHook(prof):
        prof.disable()
        t = torch.empty(64, dtype=torch.uint8)
        prof.enable()
        u = torch.empty(32, dtype=torch.uint8)
        del t  # allocated while disabled: its free is not an anomaly
        assert cpu(prof).current_usage_bytes == 32
        del u
    assert cpu(prof).current_usage_bytes == 0
    assert prof.anomalies["total"] == 0


def test_a_second_profiler_takes_over_until_it_stops(prof):
    other = MemoryProfiler(auto_snapshot=False)
    first = CPUAllocatorHook(prof).start()
    a = torch.empty(10, dtype=torch.uint8)
    with CPUAllocatorHook(other) as second:
        b = torch.empty(20, dtype=torch.uint8)
        assert first.active and not first.fed and second.fed
    c = torch.empty(40, dtype=torch.uint8)  # the first is fed again
    assert first.fed and cpu_allocator.load_hook().torchmem_cpu_hook_active() == 1
    assert cpu(prof).current_usage_bytes == 50
    assert cpu(other).current_usage_bytes == 20
    first.stop()
    d = torch.empty(80, dtype=torch.uint8)  # nobody's
    del a, b, c, d  # each free goes to the profiler that saw the allocation
    assert cpu(prof).current_usage_bytes == cpu(other).current_usage_bytes == 0
    # Stopped out of order: the one below stays fed.
    first.start()
    second = CPUAllocatorHook(other).start()
    first.stop()
    assert second.fed
    e = torch.empty(5, dtype=torch.uint8)
    assert cpu(other).current_usage_bytes == 5
    second.stop()
    del e
    assert prof.anomalies["total"] == other.anomalies["total"] == 0
    other.close()


def test_stack_names_the_user_line():
    p = MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    with CPUAllocatorHook(p):
        t = torch.ones(10)  # noqa: F841 - the allocation site
    (leak,) = p.detect_potential_leaks()
    filename, _line, function = leak.stack_trace.frames[0]
    assert (filename, function) == (__file__, "test_stack_names_the_user_line")
    p.close()


def test_tensors_from_before_the_first_start_are_adopted():
    # A fresh process: adoption happens on the first start only.
    done = run_python("""
        import weakref
        import torch
        from torchmem import MemoryProfiler
        from torchmem.sources.cpu_allocator import CPUAllocatorHook
        class Obj:
            pass
        obj = Obj()
        dead_proxy = [weakref.proxy(obj)]  # the scan must step over it
        del obj
        before = torch.empty(1000, dtype=torch.uint8)
        p = MemoryProfiler(auto_snapshot=False)
        with CPUAllocatorHook(p):
            assert p.get_statistics_for_type("CPU").current_usage_bytes == 1000
            del before
            assert p.get_statistics_for_type("CPU").current_usage_bytes == 0
        assert p.anomalies["total"] == 0
        print("ok")
    """)
    assert done.stdout.strip() == "ok", done.stderr


def test_forked_child_is_not_recorded(prof):
    with CPUAllocatorHook(prof):
        keep = torch.empty(50, dtype=torch.uint8)
        pid = os.fork()
        if pid == 0:  # the child allocates and frees; it must neither crash nor record
            code = 0
            try:
                x = torch.empty(4096, dtype=torch.uint8)
                del x, keep
                code = 0 if prof.get_statistics_for_type("CPU").current_usage_bytes == 50 else 3
            except BaseException:
                code = 4
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert cpu(prof).current_usage_bytes == 50
        del keep


def test_build_without_compiler_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHMEM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HookUnavailable, match="no C.. compiler"):
        build_hook()


def test_build_failure_shows_the_compiler_output(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHMEM_CACHE_DIR", str(tmp_path))
    fake = tmp_path / "fakecxx"
    fake.write_text("#!/bin/sh\necho 'fakecxx: error: no luck' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(HookUnavailable, match="no luck"):
        build_hook()
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".so"] == []


def test_enable_falls_back_to_the_dispatch_mode(tmp_path):
    done = run_python("""
        import warnings, torch, torchmem
        from torchmem import _session
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = torchmem.enable(trace=False, summary=False, gc=False, auto_snapshot=False)
        print(type(_session._session.host).__name__)
        print(any("dispatch mode" in str(w.message) for w in caught))
        t = torch.empty(100, dtype=torch.uint8)
        print(p.get_statistics_for_type("CPU").current_usage_bytes)
    """, TORCHMEM_CACHE_DIR=str(tmp_path), CXX="", PATH=str(tmp_path))
    assert done.stdout.split() == ["HostTracker", "True", "100"], done.stderr


def test_corrupt_cached_library_is_rebuilt(tmp_path, monkeypatch):
    from torchmem.sources import _build, cpu_allocator

    code = """
        import torch
        from torchmem import MemoryProfiler
        from torchmem.sources.cpu_allocator import CPUAllocatorHook, build_hook
        p = MemoryProfiler(auto_snapshot=False)
        with CPUAllocatorHook(p):
            t = torch.empty(10, dtype=torch.uint8)
            print(p.get_statistics_for_type("CPU").current_usage_bytes)
        print(build_hook())
    """
    # Where the hook is cached in tmp_path (named without building it: a run
    # that built it first only to learn the name took a compile and a process).
    monkeypatch.setenv("TORCHMEM_CACHE_DIR", str(tmp_path))
    path = _build._library_path(cpu_allocator._SPEC, _build.compiler())
    path.write_bytes(b"not a shared library")
    second = run_python(code, TORCHMEM_CACHE_DIR=str(tmp_path))
    assert second.stdout.split() == ["10", str(path)], second.stderr
    assert os.path.getsize(path) > 1000
