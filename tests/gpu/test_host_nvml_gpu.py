"""NVML totals and pinned host memory on a real GPU machine."""

from __future__ import annotations


def test_nvml_totals_are_consistent(run_gpu_script):
    run_gpu_script("""
        import os
        import torch
        from torchmem.sources import nvml
        torch.cuda.init()
        x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
        devices = nvml.query_devices()
        assert isinstance(devices, list) and devices, devices
        d = devices[0]
        assert d.total_bytes > 0 and d.name
        # used + free = total, up to the driver's own rounding.
        assert abs(d.used_bytes + d.free_bytes - d.total_bytes) <= 64 * 2**20, d
        # This process holds at least the tensor (plus the CUDA context).
        if d.process_used_bytes is not None:
            assert d.process_used_bytes >= 256 * 2**20, d
        print("OK")
    """)


def test_pinned_memory_is_labelled_pinned(run_gpu_script):
    run_gpu_script("""
        import torch, torchmem
        from torchmem.sources.host import HostTracker
        p = torchmem.MemoryProfiler(auto_snapshot=False)
        with HostTracker(p):
            t = torch.ones(256).pin_memory()
            assert t.is_pinned()
            s = p.get_statistics()
            assert s.usage_by_type.get("Pinned") == 1024, s.usage_by_type
            del t
        assert p.get_statistics_for_type("Pinned").current_usage_bytes == 0
        print("OK")
    """)
