"""memory_viz export: read back by torch.cuda._memory_viz, every alloc and free present."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import stat

import pytest
from torch.cuda import _memory_viz as mv

import torchmem
from torchmem.export import export_memory_viz, memory_viz, to_memory_viz

from _trace_helpers import KB, make_workload


@pytest.fixture
def prof():
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    make_workload(p)
    yield p
    p.close()


def _entries(d, device, action):
    return [(e["addr"], e["size"]) for e in d["device_traces"][device] if e["action"] == action]


def test_every_alloc_and_free_is_in_the_device_traces(prof):
    d = to_memory_viz(prof)
    assert d["torchmem_devices"] == {0: "cuda:0", 1: "cuda:1", 2: "host"}
    assert _entries(d, 0, "alloc") == [(0x7000, 16 * KB), (0x8000, KB)]
    assert _entries(d, 0, "free_requested") == _entries(d, 0, "free_completed") == [
        (0x7000, 16 * KB), (0x8000, KB)]
    assert _entries(d, 1, "alloc") == [(0x9000, 2 * KB)] and not _entries(d, 1, "free_completed")
    assert _entries(d, 2, "alloc") == [(0x1000, 4 * KB), (0x2000, 8 * KB), (0x5000, KB),
                                       (0x6000, 3 * KB)]
    assert _entries(d, 2, "free_completed") == [(0x2000, 8 * KB), (0x5000, KB)]
    oom = [e for e in d["device_traces"][0] if e["action"] == "oom"]
    assert [(e["size"], e["device_free"]) for e in oom] == [(1 << 30, 512 * KB)]
    first = d["device_traces"][2][0]
    assert first["frames"][0]["name"] == "make_workload"
    assert first["frames"][0]["filename"].endswith("_trace_helpers.py")
    assert first["stream"] == 0 and d["device_traces"][0][0]["stream"] == 7
    events = prof.get_event_rows()
    assert first["time_us"] == int(events["timestamp_ns"][0]) // 1000


def test_segments_cover_every_block_and_hold_the_live_ones(prof):
    d = to_memory_viz(prof)
    for device, trace in enumerate(d["device_traces"]):
        segs = [s for s in d["segments"] if s["device"] == device]
        for e in trace:
            if "addr" in e:  # memory_viz's segment view needs every block inside a segment
                assert any(s["address"] <= e["addr"] < s["address"] + s["total_size"] for s in segs)
        for s in segs:
            assert sum(b["size"] for b in s["blocks"]) == s["total_size"]
    live = sorted((b["address"], b["size"]) for s in d["segments"] for b in s["blocks"]
                  if b["state"] == "active_allocated")
    assert live == [(0x1000, 4 * KB), (0x6000, 3 * KB), (0x9000, 2 * KB)]


def test_torch_memory_viz_reads_it(prof):
    d = to_memory_viz(prof)
    text = mv.trace(d)
    assert "Device 0" in text and "Device 2" in text
    assert text.count("free completed") == 4  # 2 on cuda:0, 2 on host
    assert "raise OutOfMemoryError" in text
    flame = mv.segments(d, format_flamegraph=lambda lines: lines)
    assert "_trace_helpers.py" in flame and "active_allocated" in flame
    assert "active_allocated" in mv.memory(d, format_flamegraph=lambda lines: lines)
    assert "total_allocated: 9.0KiB" in mv.segsum(d)  # its own accounting asserts pass
    assert "snapshot.pickle" in mv.trace_plot(d) and "snapshot.pickle" in mv.segment_plot(d)


def test_export_file_is_the_pickled_dict(prof, tmp_path):
    out = tmp_path / "snap.pickle"
    export_memory_viz(prof, out)
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    # Read back by an unpickler that refuses every global: plain lists,
    # dicts, ints and strings only (what memory_viz's own unpickler reads).
    assert _plain_unpickle(out.read_bytes()) == to_memory_viz(prof)
    ops = {op.name for op, _, _ in pickletools.genops(out.read_bytes())}
    assert not ops & {"GLOBAL", "STACK_GLOBAL", "REDUCE", "BUILD", "INST", "OBJ", "NEWOBJ"}


def _plain_unpickle(data: bytes):
    class Plain(pickle.Unpickler):
        def find_class(self, module, name):
            raise AssertionError(f"the export refers to {module}.{name}")

    return Plain(io.BytesIO(data)).load()


def test_export_streams_many_entries_in_pieces(tmp_path):
    # More entries than one pickled piece holds, on two devices: the pieces
    # join into the same lists, frames shared within a piece or not.
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    n = memory_viz._BATCH + 100
    for i in range(n):
        p.track_allocation(0x10000 + 64 * i, 64, "GPU", device=i % 2)
    for i in range(0, n, 3):
        p.track_deallocation(0x10000 + 64 * i)
    out = tmp_path / "many.pickle"
    export_memory_viz(p, out)
    got = _plain_unpickle(out.read_bytes())
    assert got == to_memory_viz(p)
    allocs = [len([e for e in t if e["action"] == "alloc"]) for t in got["device_traces"]]
    assert allocs == [(n + 1) // 2, n // 2]
    p.close()


def test_empty_profiler():
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    d = to_memory_viz(p)
    assert d == {"segments": [], "device_traces": [], "torchmem_devices": {}}
    assert mv.trace(d) == "" and "segments: 0" in mv.segsum(d)
    p.close()
