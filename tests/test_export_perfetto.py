"""Perfetto / Chrome trace JSON: counters per type and device, steps, GC slices, OOM instants."""

from __future__ import annotations

import json

import torchmem
from torchmem.export import export_perfetto

from _trace_helpers import KB, make_workload


def _load(tmp_path):
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    make_workload(p)
    out = tmp_path / "trace.json"
    seen = []
    export_perfetto(p, out, progress=lambda done, total: seen.append((done, total)))
    p.close()
    assert seen and seen[-1][0] == seen[-1][1]
    return json.loads(out.read_text())


def _counter(trace, name):
    return [e["args"]["bytes"] for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == name]


def test_counters_per_type_and_device(tmp_path):
    trace = _load(tmp_path)
    names = {e["name"] for e in trace["traceEvents"] if e["ph"] == "C"}
    assert names == {"total", "CPU host", "GPU cuda:0", "GPU cuda:1", "Pinned host"}
    # Samples in one microsecond collapse to the last, so compare the ends and maxima.
    assert _counter(trace, "CPU host")[-1] == 4 * KB and max(_counter(trace, "CPU host")) == 12 * KB
    assert _counter(trace, "GPU cuda:0")[-1] == 0 and max(_counter(trace, "GPU cuda:0")) <= 17 * KB
    assert _counter(trace, "GPU cuda:1") == [2 * KB]
    assert _counter(trace, "Pinned host")[-1] == 3 * KB
    assert _counter(trace, "total")[-1] == 9 * KB and max(_counter(trace, "total")) <= 28 * KB
    ts = [e["ts"] for e in trace["traceEvents"] if e["ph"] == "C" and e["name"] == "total"]
    assert ts == sorted(ts) and ts[0] == 0


def test_steps_gc_and_oom(tmp_path):
    trace = _load(tmp_path)
    ev = trace["traceEvents"]
    steps = [e["name"] for e in ev if e["ph"] == "X" and e.get("tid") == 1]
    assert steps == ["step 0", "step 1", "step 2", "step 3"]
    gc = [e for e in ev if e["ph"] == "X" and e["name"].startswith("gc")]
    assert [(e["name"], e["args"]["collected"]) for e in gc] == [("gc gen 2", 5)]
    assert gc[0]["dur"] >= 0
    oom = [e for e in ev if e["ph"] == "i" and e["name"] == "out of memory"]
    assert [(e["args"]["requested_bytes"], e["args"]["device"]) for e in oom] == [(1 << 30, "cuda:0")]
    snaps = [e for e in ev if e["ph"] == "i" and e["name"] == "snapshot"]
    assert [e["args"]["current_usage_bytes"] for e in snaps] == [24 * KB]
    assert trace["otherData"]["producer"] == "torchmem"
    names = {e["args"]["name"] for e in ev if e["ph"] == "M"}
    assert names == {"torchmem", "steps", "gc", "markers"}
