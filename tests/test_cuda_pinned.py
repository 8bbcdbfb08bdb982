"""The wrapper of torch's CUDA host (pinned memory) allocator, built against
the installed torch and driven on CPU: a fake inner allocator stands in for
torch's CUDA host allocator (a CPU-only torch registers none), and blocks
are taken from at::getHostAllocator(kCUDA) as pin_memory() takes them.
Each case runs in a fresh interpreter: the host allocator is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

torch = pytest.importorskip("torch")

PRELUDE = """
import ctypes, torch, torchmem
from torchmem import MemoryEventType, _native
from torchmem.sources import pinned
lib = pinned.load_pinned_hook()
for name, res, args in (("torchmem_pinned_test_register_fake", ctypes.c_int, []),
                        ("torchmem_pinned_test_alloc", ctypes.c_void_p, [ctypes.c_size_t]),
                        ("torchmem_pinned_test_data", ctypes.c_void_p, [ctypes.c_void_p]),
                        ("torchmem_pinned_test_record_event", ctypes.c_int, [ctypes.c_void_p]),
                        ("torchmem_pinned_test_free", None, [ctypes.c_void_p]),
                        ("torchmem_pinned_test_fake_live", ctypes.c_size_t, [])):
    getattr(lib, name).restype = res
    getattr(lib, name).argtypes = args
assert lib.torchmem_pinned_test_register_fake() == 1
prof = torchmem.MemoryProfiler(auto_snapshot=False)
_native.set_host_recorder(prof)
def pinned_events():
    return [(e.event_type, e.address, e.size_bytes, e.allocation_type, e.device)
            for e in prof.get_events()]
"""


def run(code: str) -> None:
    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch: its own host allocator is registered")
    proc = subprocess.run([sys.executable, "-c", PRELUDE + textwrap.dedent(code)],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert proc.returncode == 0 and "OK" in proc.stdout.splitlines(), proc.stderr[-4000:]


def test_pinned_blocks_are_recorded_with_their_lifetime():
    run("""
        pinned.install()
        assert lib.torchmem_pinned_active() == 1
        h = lib.torchmem_pinned_test_alloc(4096)
        ptr = lib.torchmem_pinned_test_data(h)
        assert pinned_events() == [(MemoryEventType.ALLOCATION, ptr, 4096, "Pinned", -1)]
        assert prof.get_statistics_for_type("Pinned").current_usage_bytes == 4096
        lib.torchmem_pinned_test_free(h)
        assert pinned_events()[1:] == [(MemoryEventType.DEALLOCATION, ptr, 4096, "Pinned", -1)]
        assert lib.torchmem_pinned_test_fake_live() == 0  # torch's block went back
        assert prof.anomalies["total"] == 0
        print("OK")
    """)


def test_record_event_gets_torchs_own_context_back():
    # torch passes a block's context back in record_event (non_blocking
    # copies); its allocator must get the context it made, not the wrapper's.
    run("""
        h0 = lib.torchmem_pinned_test_alloc(64)   # before the wrapper: torch's own
        pinned.install()
        h1 = lib.torchmem_pinned_test_alloc(64)   # through the wrapper
        assert lib.torchmem_pinned_test_record_event(h0) == 1
        assert lib.torchmem_pinned_test_record_event(h1) == 1
        lib.torchmem_pinned_test_free(h0)
        lib.torchmem_pinned_test_free(h1)
        assert len(prof.get_events()) == 2  # only h1 was recorded, alloc and free
        print("OK")
    """)


def test_after_uninstall_frees_of_recorded_blocks_still_count():
    run("""
        pinned.install()
        h = lib.torchmem_pinned_test_alloc(1000)
        pinned.uninstall()
        assert lib.torchmem_pinned_active() == 0
        h2 = lib.torchmem_pinned_test_alloc(10)  # torch's allocator again: not recorded
        lib.torchmem_pinned_test_free(h)
        lib.torchmem_pinned_test_free(h2)
        assert [e[0] for e in pinned_events()] == [MemoryEventType.ALLOCATION,
                                                    MemoryEventType.DEALLOCATION]
        assert prof.get_statistics_for_type("Pinned").current_usage_bytes == 0
        pinned.install()  # and back
        assert lib.torchmem_pinned_active() == 1
        print("OK")
    """)


def test_stacks_of_pinned_allocations():
    run("""
        import inspect
        prof.capture_stack_traces = True
        _native.set_stack_capture(True, 10)
        pinned.install()
        def pin():
            return lib.torchmem_pinned_test_alloc(256)
        h = pin()
        [ev] = prof.get_events()
        assert ev.stack_trace is not None and ev.stack_trace.frames[0][2] == "pin", ev.stack_trace
        lib.torchmem_pinned_test_free(h)
        print("OK")
    """)


def test_what_a_cpu_build_of_torch_says():
    from torchmem.sources import pinned

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch")
    assert pinned.pinned_unavailable_reason() == (
        "torch is a CPU-only build: it has no CUDA host allocator")
    with pytest.raises(pinned.PinnedUnavailable, match="CPU-only"):
        pinned.PinnedMemoryHook(torchmem_profiler()).start()


def torchmem_profiler():
    import torchmem

    return torchmem.MemoryProfiler(auto_snapshot=False)


def test_the_cpu_hook_says_why_pinned_memory_is_not_recorded():
    import torchmem
    from torchmem.sources.cpu_allocator import CPUAllocatorHook

    if torch.version.cuda is not None:
        pytest.skip("a CUDA build of torch")
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with CPUAllocatorHook(p) as hook:
        assert hook.pinned_status == ("not recorded: torch is a CPU-only build: it has no CUDA "
                                      "host allocator")
    p.close()


def test_the_dispatch_trackers_pinned_probe_waits_for_a_cuda_context(monkeypatch):
    # is_pinned() on a machine with CUDA asks the runtime, which makes a
    # context on the current device if none exists: the dispatch tracker must
    # not probe before any device has a context (then nothing is pinned).
    import torchmem
    from torchmem.sources import host

    contexts = {0: False, 1: False}
    probed = []
    monkeypatch.setattr(host, "_accelerator_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_hasPrimaryContext", lambda d: contexts[d], raising=False)
    monkeypatch.setattr(host._Tensor, "is_pinned", lambda t: probed.append(t.numel()) or False)
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with host.HostTracker(p):
        a = torch.ones(16)
        assert probed == []  # no context anywhere: no probe, labelled CPU
        contexts[1] = True   # CUDA work on device 1 made one
        b = torch.ones(32)
        c = torch.ones(8)
    assert probed == [32, 8]
    assert p.get_statistics().usage_by_type.get("CPU") == (16 + 32 + 8) * 4
    del a, b, c
    p.close()
