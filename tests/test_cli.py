"""The torchmem command: run, summary, leaks, export, diff, and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

import torchmem
from torchmem.cli import main
from torchmem.storage import SQLiteStorage, load

from _trace_helpers import make_workload

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    keep = []
    for i in range(int(sys.argv[1])):
        x = torch.ones(256) * 2          # 1 KiB, freed next iteration
        keep.append(torch.zeros(512))    # 2 KiB, kept: grows with the argument
    print("script done", len(keep))
    sys.exit(3)
""")


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    script = d / "train.py"
    script.write_text(SCRIPT)
    out = {}
    for n in (2, 5):
        path = d / f"run{n}.db"
        r = subprocess.run([sys.executable, "-m", "torchmem", "run", "-o", str(path),
                            str(script), str(n)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 3, r.stderr  # the script's own exit status
        assert f"script done {n}" in r.stdout
        assert "trace written to" in r.stderr and "live at end" in r.stderr
        out[n] = path
    return out


def test_run_writes_a_trace_with_the_scripts_allocations(traces):
    prof = load(traces[5])
    sites = {leak.stack_trace.frames[0][1] for leak in prof.detect_potential_leaks()
             if leak.stack_trace and leak.stack_trace.frames[0][0].endswith("train.py")}
    assert 7 in sites  # the kept zeros(512)
    kept = [l for l in prof.detect_potential_leaks() if l.size_bytes == 2048]
    assert len(kept) == 5
    assert prof.trace_metadata["argv"][-1] == "5"


def test_run_without_stacks(tmp_path):
    script = tmp_path / "t.py"
    script.write_text("import torch\nkeep = torch.zeros(512)\n")
    path = tmp_path / "nostack.db"
    r = subprocess.run([sys.executable, "-m", "torchmem", "run", "-o", str(path), "--no-stacks",
                        str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    leaks = load(path).detect_potential_leaks()
    assert any(l.size_bytes == 2048 for l in leaks)
    assert all(l.stack_trace is None for l in leaks)


def test_summary_merges_several_traces(traces, capsys):
    assert main(["summary", str(traces[2]), str(traces[5])]) == 0
    out = capsys.readouterr().out
    assert str(traces[2]) in out and "all (merged)" in out and "sum of peaks" in out


def test_leaks(traces, capsys):
    assert main(["leaks", str(traces[5]), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "2.0 KiB at 0x" in out and "train.py" in out


def test_diff_shows_per_site_growth(traces, capsys):
    assert main(["diff", str(traces[2]), str(traces[5])]) == 0
    lines = capsys.readouterr().out.splitlines()
    growth = [l for l in lines if "train.py:7 in <module>" in l]
    assert growth and "+6.0 KiB" in growth[0]  # 3 more kept tensors of 2 KiB


@pytest.mark.parametrize("fmt", ["memory_viz", "perfetto", "html"])
def test_export(traces, tmp_path, capsys, fmt):
    out = tmp_path / f"out.{fmt}"
    assert main(["export", str(traces[5]), "--format", fmt, "-o", str(out), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "100.0%" in err and f"wrote {out}" in err
    data = out.read_bytes()
    if fmt == "perfetto":
        assert json.loads(data)["traceEvents"]
    elif fmt == "html":
        assert data.startswith(b"<!DOCTYPE html>")
    else:
        # A protocol-2 pickle (written in pieces: docs/trace-format.md), not unpickled here.
        assert data[:2] == b"\x80\x02" and data.endswith(b".")


def test_bad_traces_give_one_line_errors(tmp_path, capsys):
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a trace")
    good = tmp_path / "good.db"
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(good), auto_snapshot=False)
    make_workload(p)
    p.close()
    corrupt = tmp_path / "corrupt.db"
    data = good.read_bytes()
    corrupt.write_bytes(data[: len(data) - 1000])
    for path, words in ((tmp_path / "missing.db", "no such file"),
                        (foreign, "not a torchmem trace"), (corrupt, "truncated")):
        for argv in (["summary", str(path)], ["leaks", str(path)], ["diff", str(good), str(path)],
                     ["export", str(path), "-f", "html", "-o", str(tmp_path / "x.html")]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and err.startswith("torchmem: error: ") and words in err


def test_run_refuses_to_clobber(tmp_path, capsys):
    existing = tmp_path / "t.db"
    existing.write_text("x")
    script = tmp_path / "s.py"
    script.write_text("pass\n")
    assert main(["run", "-o", str(existing), str(script)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.py")]) == 2
