"""torchmem.enable(): one profiler per process, thread safe, resumable; the
TORCHMEM=1 hook and `python -m torchmem run` on an unmodified script."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import threading

import pytest
import torch

import torchmem
from torchmem import _session

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")
PTH = os.path.join(SRC, "torchmem-autoenable.pth")
SCRIPT = """\
import torch
a = torch.zeros(1024)
b = torch.zeros(2048)
del a
print("script ran")
"""


@pytest.fixture
def session(tmp_path):
    _session._reset_for_tests()
    yield tmp_path
    _session._reset_for_tests()


def test_enable_is_idempotent_and_applies_live_settings(session):
    p = _session.enable(trace_dir=str(session), summary=False, auto_snapshot=False)
    assert isinstance(p, torchmem.MemoryProfiler) and "gpu" in p._native_sources
    assert _session.enable() is p and _session.get_profiler() is p
    assert p.capture_stack_traces  # on by default: reports name lines
    assert _session.enable(capture_stack_traces=False, max_stack_trace_depth=4) is p
    assert (p.capture_stack_traces, p.max_stack_trace_depth) == (False, 4)
    with pytest.warns(RuntimeWarning, match="trace_dir cannot change"):
        _session.enable(trace_dir="/elsewhere")
    with pytest.raises(TypeError, match="unknown setting"):
        _session.enable(colour="red")
    path = _session.trace_path()
    assert os.path.dirname(path) == str(session) and path.endswith(f"-{os.getpid()}.db")


def test_enable_from_many_threads_makes_one_profiler(session):
    barrier = threading.Barrier(8)
    got = []

    def worker():
        barrier.wait()
        got.append(_session.enable(trace=False, summary=False, host=False, auto_snapshot=False))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 8 and len({id(p) for p in got}) == 1


def test_disable_then_enable_resumes_the_same_profiler(session):
    p = _session.enable(trace=False, summary=False, auto_snapshot=False)
    x = torch.ones(256)
    assert p.get_statistics_for_type("CPU").current_usage_bytes == 1024
    _session.disable()
    assert not _session.is_enabled() and _session.get_profiler() is p
    y = torch.ones(512)
    assert p.get_statistics_for_type("CPU").allocation_count == 1
    assert _session.enable() is p and _session.is_enabled()
    z = torch.ones(128)
    stats = p.get_statistics_for_type("CPU")
    assert (stats.allocation_count, stats.current_usage_bytes) == (2, 1024 + 512)
    del x, y, z


def test_optimizer_steps_advance_the_step(session):
    p = _session.enable(trace=False, summary=False, auto_snapshot=False)
    w = torch.nn.Parameter(torch.ones(4))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(3):
        w.sum().backward()
        opt.step()
    assert p.current_step == 3


def _run(args, tmp_path, **env):
    (tmp_path / "train.py").write_text(SCRIPT)
    full = dict(os.environ, TORCHMEM_DIR=str(tmp_path / "traces"), **env)
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=full, capture_output=True,
                          text=True, timeout=120)


def _check_trace_and_summary(r, tmp_path):
    assert r.returncode == 0, r.stderr
    assert "script ran" in r.stdout
    [trace] = (tmp_path / "traces").glob("torchmem-*.db")
    assert f"trace: {trace}" in r.stderr
    assert "peak CPU      host         12.00 KiB" in r.stderr
    assert "8.00 KiB in       1 allocations" in r.stderr and "train.py:3 in <module>" in r.stderr
    from torchmem.storage import load

    saved = load(trace)
    stats = saved.get_statistics()
    assert (stats.total_allocated_bytes, stats.peak_usage_bytes) == (12288, 12288)


def test_torchmem_env_hook_on_an_unmodified_script(tmp_path):
    # What the installed .pth runs at start-up, then the script as `python train.py` would.
    with open(PTH) as f:
        line = f.read().strip()
    code = f"{line}\nimport runpy; runpy.run_path('train.py', run_name='__main__')"
    r = _run(["-c", code], tmp_path, TORCHMEM="1")
    _check_trace_and_summary(r, tmp_path)


def test_without_the_variable_nothing_happens(tmp_path):
    with open(PTH) as f:
        line = f.read().strip()
    r = _run(["-c", f"{line}\nimport sys; print('torchmem' in sys.modules)"], tmp_path,
             TORCHMEM="0")
    assert r.stdout.strip() == "False" and r.stderr == ""
    assert not (tmp_path / "traces").exists()


def _installed_pth() -> bool:
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return any(os.path.exists(os.path.join(d, "torchmem-autoenable.pth")) for d in dirs)


@pytest.mark.skipif(not _installed_pth(), reason="torchmem-autoenable.pth is not installed "
                    "in site-packages (reinstall the package)")
def test_torchmem_1_python_train_py(tmp_path):
    r = _run(["train.py"], tmp_path, TORCHMEM="1")
    _check_trace_and_summary(r, tmp_path)


def test_python_m_torchmem_run(tmp_path):
    r = _run(["-m", "torchmem", "run", "train.py"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "script ran" in r.stdout
    [trace] = tmp_path.glob("**/*.db")  # the CLI's own -o default, or TORCHMEM_DIR
    from torchmem.storage import load

    assert load(trace).get_statistics().peak_usage_bytes == 12288


@pytest.mark.parametrize("choice, source", [("auto", "CPUAllocatorHook"), (True, "CPUAllocatorHook"),
                                            ("allocator", "CPUAllocatorHook"),
                                            ("dispatch", "HostTracker"), (False, "NoneType")])
def test_host_source_choice(session, choice, source):
    p = _session.enable(trace=False, summary=False, auto_snapshot=False, gc=False, host=choice)
    assert type(_session._session.host).__name__ == source
    t = torch.empty(1000, dtype=torch.uint8)
    assert p.get_statistics_for_type("CPU").current_usage_bytes == (0 if choice is False else 1000)
    del t
    assert p.get_statistics_for_type("CPU").current_usage_bytes == 0


def test_host_source_from_the_environment_and_bad_values(session, monkeypatch):
    monkeypatch.setenv("TORCHMEM_HOST", "off")
    assert _session._defaults()["host"] is False
    monkeypatch.setenv("TORCHMEM_HOST", "Dispatch")
    assert _session._defaults()["host"] == "dispatch"
    monkeypatch.setenv("TORCHMEM_HOST", "1")
    assert _session._defaults()["host"] == "auto"
    monkeypatch.setenv("TORCHMEM_HOST", "alocator")  # a typo warns, never stops the run
    with pytest.warns(RuntimeWarning, match="TORCHMEM_HOST='alocator'"):
        assert _session._defaults()["host"] == "auto"
    monkeypatch.delenv("TORCHMEM_HOST")
    with pytest.raises(ValueError, match="host=.*'bogus'"):
        _session.enable(trace=False, summary=False, host="bogus")
    assert _session._session is None


def test_queries_never_start_profiling(session):
    # Read-only queries and checks default to the session's profiler and, with
    # none, answer or refuse; they never enable torchmem.
    import torchmem.distributed as tmd
    import torchmem.oom
    from torchmem.summary import format_summary

    assert torchmem.epoch_results() == []
    assert format_summary() == "torchmem: not enabled"
    with pytest.raises(RuntimeError, match="not enabled"):
        torchmem.mark_epoch()
    with pytest.raises(RuntimeError, match="not enabled"):
        with torchmem.epoch():
            pass
    with pytest.raises(RuntimeError, match="not enabled"):
        torchmem.oom.write_report()
    with pytest.raises(RuntimeError, match="not enabled"):
        tmd.rank_summary()
    assert _session.get_profiler() is None and not torchmem.is_enabled()


def test_the_entry_points_default_to_the_session_profiler(session):
    from torchmem.summary import format_summary

    p = _session.enable(trace_dir=str(session), summary=False, auto_snapshot=False, gc=False)
    p.track_allocation(1, 4096, "MyType")
    first = torchmem.mark_epoch()
    assert first.baseline and torchmem.epoch_results() == [first]
    text = format_summary()
    assert "MyType" in text and f"trace: {_session.trace_path()}" in text


@pytest.mark.parametrize("settings, retention", [
    ({}, 1 << 16),                              # a trace answers older queries: a small ring
    ({"trace": False}, 1 << 20),                # memory is the only copy
    ({"retention_events": 3 * 8192}, 3 * 8192),  # the setting wins (whole chunks)
    ({"trace": False, "retention_events": 8192}, 8192),
])
def test_default_retention_depends_on_the_storage(session, settings, retention):
    p = _session.enable(trace_dir=str(session), summary=False, auto_snapshot=False, **settings)
    assert p._retention == retention


def test_events_older_than_the_ring_come_back_from_the_trace(session):
    p = _session.enable(trace_dir=str(session), summary=False, auto_snapshot=False,
                        host=False, gc=False)
    n = (1 << 16) + 3 * 8192  # past the ring by three chunks
    for i in range(n // 2):
        p.track_allocation(0x10000 + i * 64, 64)
        p.track_deallocation(0x10000 + i * 64)
    p.flush()
    p.track_allocation(0x1, 1)  # the ring drops what the trace has, at the next chunk
    assert p.first_retained_seq > 0
    rows = p.get_event_rows()
    assert len(rows) == n + 1
    assert (rows["seq"] == list(range(n + 1))).all()
