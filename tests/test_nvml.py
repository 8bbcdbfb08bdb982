"""NVML device totals: unavailable without a driver, parsing against recorded answers."""

from __future__ import annotations

import os

import pytest

from torchmem import MemoryProfiler
from torchmem.sources import nvml
from torchmem.sources.nvml import DeviceMemory, NvmlUnavailable, RecordedNvml

GiB = 1 << 30

# Shaped like record_answers() output on a two-GPU machine; pid 4242 is
# another process, names come back as bytes from older pynvml releases.
RECORDED = {
    "devices": [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "memory": {"total": 80 * GiB, "used": 30 * GiB, "free": 50 * GiB},
            "processes": [
                {"pid": "SELF", "usedGpuMemory": 20 * GiB},
                {"pid": 4242, "usedGpuMemory": 10 * GiB},
                {"pid": "SELF", "usedGpuMemory": 512},  # a second context
            ],
        },
        {
            "name": b"NVIDIA H100 80GB HBM3",
            "memory": {"total": 80 * GiB, "used": 1 * GiB, "free": 79 * GiB},
            "processes": [{"pid": 4242, "usedGpuMemory": 1 * GiB}],
        },
    ]
}


def recorded(data: dict) -> RecordedNvml:
    def fix(v):
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return os.getpid() if v == "SELF" else v

    return RecordedNvml(fix(data))


@pytest.fixture
def backend():
    """Installs a backend for one test and restores pynvml afterwards."""
    installed = []

    def install(b):
        installed.append(nvml.use_backend(b))
        return b

    yield install
    nvml.use_backend(None)


def test_no_driver_here_is_unavailable_not_an_error():
    nvml.use_backend(None)
    result = nvml.query_devices()
    try:
        import pynvml

        pynvml.nvmlInit()
        pytest.skip("an NVIDIA driver is present on this machine")
    except Exception:
        pass
    assert isinstance(result, NvmlUnavailable)
    assert result.startswith("unavailable: ")
    assert result.reason and not result.available
    assert nvml.query_devices() == result  # cached: init is not retried


def test_snapshot_says_unavailable_without_driver(backend):
    backend(recorded({"init_error": "Driver Not Loaded", "devices": []}))
    p = MemoryProfiler(auto_snapshot=False)
    snap = p.track_snapshot()
    assert isinstance(snap.devices, str)
    assert snap.devices == "unavailable: nvmlInit failed (NVMLError: Driver Not Loaded)"
    p.close()


def test_parses_recorded_answers(backend):
    fake = backend(recorded(RECORDED))
    devices = nvml.query_devices()
    assert devices == [
        DeviceMemory(0, "NVIDIA H100 80GB HBM3", 80 * GiB, 30 * GiB, 50 * GiB, 20 * GiB + 512),
        DeviceMemory(1, "NVIDIA H100 80GB HBM3", 80 * GiB, 1 * GiB, 79 * GiB, None),
    ]
    nvml.query_devices()
    assert fake.init_calls == 1  # nvmlInit once, then cached


def test_not_available_process_usage_is_none(backend):
    data = {"devices": [{"name": "GPU", "memory": {"total": 10, "used": 4, "free": 6},
                         "processes": [{"pid": "SELF", "usedGpuMemory": None}]}]}
    backend(recorded(data))
    (d,) = nvml.query_devices()
    assert (d.total_bytes, d.used_bytes, d.free_bytes, d.process_used_bytes) == (10, 4, 6, None)


def test_failures_degrade_never_raise(backend):
    backend(recorded({"count_error": "GPU is lost"}))
    r = nvml.query_devices()
    assert isinstance(r, NvmlUnavailable) and "GPU is lost" in r

    data = {"devices": [
        {"error": "Unknown Error"},  # this handle fails: device left out
        {"name": {"error": "x"}, "memory": {"total": 8, "used": 2, "free": 6},
         "processes": {"error": "Not Supported"}},
    ]}
    backend(recorded(data))
    assert nvml.query_devices() == [DeviceMemory(1, "device 1", 8, 2, 6, None)]

    class Exploding:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    backend(Exploding())
    r = nvml.query_devices()
    assert r.reason.startswith("nvmlInit failed (OSError")


def test_snapshot_carries_recorded_devices(backend):
    backend(recorded(RECORDED))
    p = MemoryProfiler(auto_snapshot=False)
    snap = p.track_snapshot()
    assert [d.free_bytes for d in snap.devices] == [50 * GiB, 79 * GiB]
    p.close()
