"""Processes: Ctrl-C under `torchmem run` (issue 13 item 7), enable() in a forked child
(item 10), TORCHMEM=1 and multiprocessing's own helpers (item 11)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from torchmem.storage import load

SRC = os.path.join(os.path.dirname(__file__), os.pardir, "src")
PTH = os.path.join(SRC, "torchmem-autoenable.pth")

LOOP = textwrap.dedent("""
    import sys, time, torchmem
    p = torchmem.get_profiler()
    for i in range(1000):
        p.track_allocation(0x10000 + 64 * i, 32)
    print("ready", flush=True)
    while True:
        time.sleep(0.01)
""")


def test_ctrl_c_under_torchmem_run_ends_as_python_does(tmp_path):
    (tmp_path / "loop.py").write_text(LOOP)
    trace = tmp_path / "t.db"
    proc = subprocess.Popen([sys.executable, "-m", "torchmem", "run", "--no-stacks", "-o",
                             str(trace), "loop.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Python itself dies by SIGINT (-2 here, 130 in a shell); exit status 130 says the same.
    assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
    assert "KeyboardInterrupt" in err
    assert f"trace written to {trace}" in err
    prof = load(trace)
    assert prof.get_statistics().allocation_count >= 1000


def test_ctrl_c_plain_python_for_comparison(tmp_path):
    (tmp_path / "p.py").write_text("import time\nprint('ready', flush=True)\n"
                                   "while True:\n    time.sleep(0.01)\n")
    proc = subprocess.Popen([sys.executable, "p.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT)
