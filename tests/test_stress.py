"""Stress, CI-sized: 16 threads on one profiler, each scenario in its own process.

benchmarks/stress.py holds the scenarios (run it directly for the 30 s x 16
threads version); here each runs for a few seconds. A scenario passes when
its process exits 0 with no problem listed: counters equal to the sum of what
the threads did, the live set exactly the survivors, no anomaly but those the
threads caused on purpose, and every thread finished (a deadlock makes the
process dump its stacks and exit after --timeout).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRESS = os.path.join(ROOT, "benchmarks", "stress.py")


def run_scenario(name: str, seconds: float, timeout: float = 90.0) -> dict:
    proc = subprocess.run(
        [sys.executable, STRESS, "--scenario", name, "--seconds", str(seconds),
         "--threads", "16", "--timeout", str(timeout - 15)],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert proc.returncode == 0 and lines, (
        f"{name}: exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n"
        f"stderr:\n{proc.stderr[-3000:]}")
    result = json.loads(lines[-1])
    assert result["problems"] == []
    return result


def test_track_threads():
    r = run_scenario("track", 2.0)
    assert r["ops"] > 10_000 and r["snapshots"] > 0 and r["queries"] > 0


def test_plugin_entry_points_with_track_threads():
    r = run_scenario("plugin", 2.0)
    assert r["ops"] > 10_000 and r["allocations"] > 1000


def test_host_tracker_under_gc_heavy_workload():
    r = run_scenario("host", 2.5)
    assert r["host"]["allocations"] > 0
    assert r["host"]["live_bytes_after_gc"] == 0
    assert r["gc_records"] > 0 and r["workload"]["tensors_made"] > 0


def test_sinks_under_threads():
    r = run_scenario("sinks", 1.5)
    assert r["sinks"]["events_written"] == r["events"]
