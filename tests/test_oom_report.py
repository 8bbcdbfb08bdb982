"""OOM reports on CPU: an OOM through the plugin's fake (host-side) backend,
through profiler.record_oom, and through a raised torch.OutOfMemoryError."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchmem
from torchmem import _native, _session, oom
from torchmem import cuda as tcuda

GiB = 1 << 30
MiB = 1 << 20
_lib = ctypes.CDLL(tcuda.plugin_path())
_malloc = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(
    ctypes.cast(_lib.torchmem_malloc, ctypes.c_void_p).value)
_free = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p)(
    ctypes.cast(_lib.torchmem_free, ctypes.c_void_p).value)


@pytest.fixture
def plugin_prof():
    """The plugin with the fake backend (host memory, fails on demand) feeding a profiler."""
    tcuda.set_backend("fake")
    tcuda._set_oom_throws(False)
    clib = tcuda._clib()
    clib.torchmem_fake_fail_next(0)
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    p.attach_native_source("gpu")
    _native.set_gpu_recorder(p)
    try:
        yield p
    finally:
        _session._detach_gpu_recorder()
        _native.set_stack_capture(False, 10)
        clib.torchmem_fake_fail_next(0)
        clib.torchmem_fake_set_mem_info(0, 0)
        tcuda.set_backend("host")
        p.close()


def load_activations(n, out):
    for _ in range(n):
        out.append(_malloc(3 * MiB, 0, 5))


def test_plugin_oom_report_has_the_failed_size_and_top_site(plugin_prof, tmp_path, capsys):
    clib = tcuda._clib()
    clib.torchmem_fake_set_mem_info(1 * GiB, 80 * GiB)
    blocks = []
    try:
        _oom_with_live_blocks(plugin_prof, blocks, tmp_path, capsys)
    finally:
        for b in blocks:
            _free(b, 3 * MiB if b != blocks[-1] else 1024, 0, 5)


def _oom_with_live_blocks(plugin_prof, blocks, tmp_path, capsys):
    clib = tcuda._clib()
    load_activations(4, blocks)  # 12 MiB live from one site
    blocks.append(_malloc(1024, 0, 5))
    clib.torchmem_fake_fail_next(2)  # the try and the retry after releasing the cache
    assert _malloc(2 * GiB, 0, 5) is None
    rep = oom.report_pending(plugin_prof, directory=str(tmp_path))[0]
    d = rep.data
    assert (d["requested"], d["device"]) == (2 * GiB, 0)
    assert (d["oom"]["device_free_bytes"], d["oom"]["device_total_bytes"]) == (1 * GiB, 80 * GiB)
    assert d["oom"]["live_bytes"] == 12 * MiB + 1024
    top = d["sites"][0]
    assert (top.bytes, top.count, top.site.allocation_type, top.site.device) == (12 * MiB, 4, "GPU", 0)
    assert top.site.stack.frames[0][2] == "load_activations"
    assert d["live_total"] == 12 * MiB + 1024 and d["live_count"] == 5
    assert "Failed request: 2.00 GiB (2147483648 bytes) on device 0" in rep.text
    assert "1.00 GiB free of 80.00 GiB" in rep.text
    assert "in load_activations [GPU, device 0]" in rep.text
    assert open(rep.text_path).read() == rep.text
    assert oct(os.stat(rep.text_path).st_mode & 0o777) == "0o600"
    page = open(rep.html_path).read()
    assert page.startswith("<!DOCTYPE html>") and "<polyline" in page and "2.00 GiB" in page
    assert rep.text_path in capsys.readouterr().err
    assert oom.report_pending(plugin_prof, directory=str(tmp_path)) == []  # reported once


def test_record_oom_hook_and_allocator_view_without_cuda(tmp_path):
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    p.track_allocation(0x10, 5000, "GPU", 1)
    p.record_oom(123456, 1, 9, 1000, 2000, "GPU")
    rep = oom.write_report(p, directory=str(tmp_path), quiet=True)
    assert rep.data["requested"] == 123456 and rep.data["device"] == 1
    assert rep.data["sites"][0].bytes == 5000 and rep.data["sites_scope"] == "device 1"
    assert rep.data["allocator"] == {}  # no CUDA here: nothing to compare with
    assert "NVML: unavailable" in rep.text
    assert "Failed request: 120.56 KiB (123456 bytes) on device 1" in rep.text
    p.close()


def test_guard_reports_a_raised_out_of_memory_error_then_reraises(tmp_path, capsys):
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    p.track_allocation(0x20, 4096, "CPU")
    err = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.50 GiB. GPU 0 ...")
    oom.install(directory=str(tmp_path))
    try:
        with pytest.raises(torch.OutOfMemoryError):
            with oom.oom_guard(p):
                raise err
        path = err._torchmem_report
        assert os.path.dirname(path) == str(tmp_path)
        text = open(path).read()
        assert "Failed request: 1.50 GiB (1610612736 bytes)" in text
        assert "Error: OutOfMemoryError: CUDA out of memory." in text
        assert path in capsys.readouterr().err
        oom._handle(err)  # the excepthook sees the same error: no second report
        assert len(list(tmp_path.glob("*.txt"))) == 1
    finally:
        oom.uninstall()
        p.close()


def test_decorator_form_and_non_oom_errors_are_ignored(tmp_path):
    p = torchmem.MemoryProfiler(auto_snapshot=False)

    @oom.oom_guard(p)
    def fails(kind):
        raise kind("out of memory" if kind is RuntimeError else "other")

    oom.install(directory=str(tmp_path))
    try:
        with pytest.raises(RuntimeError):
            fails(RuntimeError)
        with pytest.raises(ValueError):
            fails(ValueError)
        assert len(list(tmp_path.glob("*.txt"))) == 1
    finally:
        oom.uninstall()
        p.close()


def test_html_escapes_every_string(tmp_path):
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    p.track_allocation(0x30, 64, "<script>alert(1)</script>")
    rep = oom.write_report(p, torch.OutOfMemoryError("out of memory <b>"),
                           directory=str(tmp_path), quiet=True)
    page = open(rep.html_path).read()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    p.close()


def test_uncaught_oom_in_a_script_writes_the_report(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import torch, torchmem
        from torchmem import _session
        prof = _session.enable(trace=False, summary=False, trace_dir=%r)
        keep = [torch.ones(1000) for _ in range(3)]
        prof.record_oom(3 << 30, 0, 0, 0, 0, "GPU")
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
    """ % str(tmp_path / "out")))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "torch.OutOfMemoryError" in r.stderr
    [txt] = (tmp_path / "out").glob("oom-*.txt")
    assert f"out-of-memory report written to {txt}" in r.stderr
    text = txt.read_text()
    assert "Failed request: 3.00 GiB (3221225472 bytes) on device 0" in text
    assert "train.py:5 in <listcomp> [CPU, host]" in text
    assert "Device at failure: free/total unknown" in text
