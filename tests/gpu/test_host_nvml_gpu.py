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


def test_cpu_allocator_hook_on_a_cuda_build(run_gpu_script):
    # On a CUDA build the hook must build, count CPU storages exactly, and
    # record pinned memory (the accelerator's host allocator) as "Pinned".
    run_gpu_script("""
        import torch, torchmem
        from torchmem.sources.cpu_allocator import CPUAllocatorHook
        p = torchmem.MemoryProfiler(auto_snapshot=False)
        with CPUAllocatorHook(p) as hook:
            assert hook.pinned_status == "recorded", hook.pinned_status
            a = torch.empty(4096, dtype=torch.uint8)
            pinned = torch.empty(8192, dtype=torch.uint8, pin_memory=True)
            g = torch.empty(1024, device="cuda")
            back = g.cpu()
            assert p.get_statistics_for_type("CPU").current_usage_bytes == 4096 + 4096, \\
                p.get_statistics().usage_by_type
            assert p.get_statistics_for_type("Pinned").current_usage_bytes == 8192
            del a, back, pinned
        assert p.get_statistics_for_type("CPU").current_usage_bytes == 0
        assert p.get_statistics_for_type("Pinned").current_usage_bytes == 0
        assert p.anomalies["total"] == 0, p.anomalies
        print("OK")
    """)


def test_pinned_bytes_from_a_dataloader(run_gpu_script):
    # DataLoader's pin-memory thread pins every batch: recorded from that
    # thread, the blocks in use at each moment, freed with the batch.
    run_gpu_script("""
        import torch, torchmem
        from torch.utils.data import DataLoader, TensorDataset
        from torchmem.sources.cpu_allocator import CPUAllocatorHook
        p = torchmem.MemoryProfiler(auto_snapshot=False)
        data = TensorDataset(torch.randn(64, 1000), torch.randint(0, 10, (64,)))
        batch_bytes = 16 * 1000 * 4 + 16 * 8
        with CPUAllocatorHook(p):
            loader = DataLoader(data, batch_size=16, pin_memory=True, num_workers=0)
            for x, y in loader:
                assert x.is_pinned() and y.is_pinned()
                live = p.get_statistics_for_type("Pinned").current_usage_bytes
                assert live >= batch_bytes, live
                on_gpu = x.to("cuda", non_blocking=True)  # record_event path
                torch.cuda.synchronize()
            del x, y, on_gpu
        pinned = p.get_statistics_for_type("Pinned")
        assert pinned.allocation_count >= 4 * 2, pinned
        assert pinned.current_usage_bytes == 0, pinned
        assert p.anomalies["total"] == 0, p.anomalies
        print("OK")
    """)


def test_the_dispatch_tracker_makes_no_context(run_gpu_script):
    run_gpu_script("""
        import torch, torchmem
        from torchmem.sources.host import HostTracker
        p = torchmem.MemoryProfiler(auto_snapshot=False)
        with HostTracker(p):
            x = torch.ones(1000) * 2
        assert not any(torch._C._cuda_hasPrimaryContext(d)
                       for d in range(torch.cuda.device_count())), "a CUDA context was made"
        print("OK")
    """)
