"""Processes: Ctrl-C under `torchmem run` (issue 13 item 7), enable() in a forked child
(item 10), TORCHMEM=1 and multiprocessing's own helpers (item 11)."""

from __future__ import annotations

import glob
import json
import os
import site
import signal
import subprocess
import sys
import textwrap

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


def _default_sigint() -> None:
    # A job started in the background of a non-interactive shell (as a CI
    # runner may start this suite) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: what a terminal's Ctrl-C reaches
    # is a process with SIGINT at its default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_under_torchmem_run_ends_as_python_does(tmp_path):
    (tmp_path / "loop.py").write_text(LOOP)
    trace = tmp_path / "t.db"
    proc = subprocess.Popen([sys.executable, "-m", "torchmem", "run", "--no-stacks", "-o",
                             str(trace), "loop.py"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
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
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGINT)


# -- item 10: enable() in a forked child -------------------------------------------

FORK_SCRIPT = textwrap.dedent("""
    import json, multiprocessing as mp, os, sys
    import torchmem

    def child(q):
        before = (torchmem.is_enabled(), torchmem.trace_path(),
                  torchmem.get_profiler() is not None)
        p = torchmem.enable(trace_dir=sys.argv[1], summary=False)
        p.track_allocation(0x10, 123, allocation_type="child-type")
        from torchmem.sources.context import autograd_hooks
        q.put(dict(before=before, after=(torchmem.is_enabled(), torchmem.trace_path()),
                   same=p is parent, pid=os.getpid(), hooks=autograd_hooks(wait_s=120)))

    parent = torchmem.enable(trace_dir=sys.argv[1], summary=False)
    parent.track_allocation(0x20, 456, allocation_type="parent-type")
    q = mp.get_context("fork").SimpleQueue()
    proc = mp.get_context("fork").Process(target=child, args=(q,))
    proc.start()
    seen = q.get()
    proc.join(120)
    seen.update(exitcode=proc.exitcode, parent_trace=torchmem.trace_path(), parent_pid=os.getpid())
    print(json.dumps(seen))
""")


@pytest.mark.parametrize("cache", ["warm", "cold"])
def test_enable_in_a_forked_child_records_its_own_trace(tmp_path, cache):
    # Cold: the parent's enable() is still compiling the autograd hooks on a
    # background thread when it forks; the child once waited forever for the
    # build lock that thread held (CI, first run on a clean machine).
    env = dict(os.environ)
    if cache == "cold":
        env["TORCHMEM_CACHE_DIR"] = str(tmp_path / "cache")
    traces = tmp_path / "traces"
    (tmp_path / "script.py").write_text(FORK_SCRIPT)
    r = subprocess.run([sys.executable, "script.py", str(traces)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.splitlines()[-1])
    assert seen["exitcode"] == 0
    # The child's own hooks, not a parent's build that never ends there.
    assert seen["hooks"] == "native"
    # Before enable() the child says it is not profiled: nothing records its memory.
    assert seen["before"] == [False, None, False]
    assert seen["same"] is False
    enabled, child_trace = seen["after"]
    assert enabled is True
    assert child_trace != seen["parent_trace"]
    assert child_trace.endswith(f"-{seen['pid']}.db")
    assert seen["parent_trace"].endswith(f"-{seen['parent_pid']}.db")
    assert sorted(glob.glob(str(traces / "*.db"))) == sorted([child_trace, seen["parent_trace"]])
    child = load(child_trace)
    assert child.get_statistics_for_type("child-type").total_allocated_bytes == 123
    assert child.get_statistics_for_type("parent-type").total_allocated_bytes == 0
    parent = load(seen["parent_trace"])
    assert parent.get_statistics_for_type("parent-type").total_allocated_bytes == 456
    assert parent.get_statistics_for_type("child-type").total_allocated_bytes == 0
    assert os.path.getsize(child_trace) > 0


# -- item 11: TORCHMEM=1 and multiprocessing's own helpers ----------------------------
HELPERS = textwrap.dedent("""
    import multiprocessing as mp

    def work(x):
        return 2 * x

    if __name__ == "__main__":
        for method in ("spawn", "forkserver"):
            ctx = mp.get_context(method)
            with ctx.Pool(1) as pool:  # its queues' semaphores start the resource tracker
                print(method, pool.map(work, [1, 2]), flush=True)
""")


def _installed_pth() -> bool:
    dirs = site.getsitepackages() + [site.getusersitepackages()]
    return any(os.path.exists(os.path.join(d, "torchmem-autoenable.pth")) for d in dirs)


@pytest.mark.skipif(not _installed_pth(), reason="torchmem-autoenable.pth is not installed "
                    "in site-packages (reinstall the package)")
def test_torchmem_1_leaves_multiprocessing_helpers_alone(tmp_path):
    (tmp_path / "helpers.py").write_text(HELPERS)
    traces = tmp_path / "traces"
    env = dict(os.environ, TORCHMEM="1", TORCHMEM_DIR=str(traces))
    r = subprocess.run([sys.executable, "helpers.py"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:2] == ["spawn [2, 4]", "forkserver [2, 4]"]
    # One trace and one summary: the script's (the resource tracker, the forkserver
    # and the pool workers run none of the user's code at start-up).
    made = glob.glob(str(traces / "*.db"))
    assert len(made) == 1, made
    assert r.stderr.count("trace: ") == 1, r.stderr
    assert f"trace: {made[0]}" in r.stderr
