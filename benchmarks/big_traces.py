"""Reading big traces: the CLI verbs, ``load`` and the queries on 1M- and 10M-event traces.

    python benchmarks/big_traces.py [--sizes 1M,10M] [--repeats 3] [--cache DIR] [--only NAME,...]

The traces are written once, by a small-MLP-like loop recorded into a
SQLite trace (parameters and optimizer state made once; per step, forward
activations, gradients and optimizer temporaries made and freed, and one
tensor kept every 4 steps: a growing "loss history"; a GC every 1000 steps,
a snapshot every 5000), into ``--cache`` (default
``~/.cache/torchmem-bench/big_traces``, outside the repository; never in
CI), and reused by later runs while the file is there.

Every measurement is its own fresh process (``python -m torchmem ...`` or
``python -c ...``), timed from start to exit (wall) with its peak RSS from
``wait4``; ``startup`` is ``import torchmem`` alone, the floor of all of
them. Prints, per size and measurement: median and range of ``--repeats``
runs, and the machine's load average before and after (the figures are
only as good as the machine was quiet).

Goals (issue 12 goal 3, issue 13 item 12): on 10M events, ``summary``,
``leaks`` and ``export -f html`` each within 3 s and 300 MiB; any export
under 200 MB whatever the size, time linear in the events.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

SIZES = {"1M": 1_000_000, "10M": 10_000_000}
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "torchmem-bench", "big_traces")


# -- writing the trace (once) -------------------------------------------------------
def _params(p, base, n):
    for i in range(n):
        p.track_allocation(base + i * 0x10000, 4096 * (i + 1))


def _optimizer_state(p, base, n):
    for i in range(n):
        p.track_allocation(base + i * 0x10000, 4096 * (i // 2 + 1))


def _linear(p, addr, size):
    p.track_allocation(addr, size)


def _activation(p, addr, size):
    p.track_allocation(addr, size)


def _grad(p, addr, size):
    p.track_allocation(addr, size)


def _adam_tmp(p, addr, size):
    p.track_allocation(addr, size)
    p.track_deallocation(addr)


def _history(p, addr):
    p.track_allocation(addr, 4)


def _mlp_step(p, step, act, grad, tmp, keep):
    free = p.track_deallocation
    for layer in range(3):  # forward: two allocations per layer, then the loss
        _linear(p, act + layer * 0x2000, 32768)
        _activation(p, act + layer * 0x2000 + 0x1000, 32768)
    _activation(p, act + 0x8000, 64)
    for i in range(8):  # backward: gradients, and temporaries that live briefly
        _grad(p, grad + i * 0x10000, 4096 * (i + 1))
        if i < 6:
            _adam_tmp(p, tmp + i * 0x1000, 32768)
    for layer in range(3):
        free(act + layer * 0x2000)
        free(act + layer * 0x2000 + 0x1000)
    free(act + 0x8000)
    for i in range(8):  # the optimizer's step
        _adam_tmp(p, tmp + 0x10000 + i * 0x1000, 4096 * (i + 1))
    for i in range(8):  # zero_grad(set_to_none=True)
        free(grad + i * 0x10000)
    if step % 4 == 0:
        _history(p, keep + step * 16)


EVENTS_PER_STEP = 6 + 1 + 8 + 12 + 7 + 16 + 8  # + 1 every 4th step


def write_trace(path: str, n_events: int) -> None:
    """Records about ``n_events`` events into a SQLite trace at ``path``."""
    import torchmem
    from torchmem.storage import SQLiteStorage

    tmp = path + ".part"
    p = torchmem.MemoryProfiler(storage=SQLiteStorage(tmp, overwrite=True),
                                capture_stack_traces=True, auto_snapshot=False)
    _params(p, 0x1_0000_0000, 12)
    _optimizer_state(p, 0x2_0000_0000, 24)
    steps = max(1, n_events * 4 // (EVENTS_PER_STEP * 4 + 1))
    t0 = time.perf_counter()
    for step in range(steps):
        _mlp_step(p, step, 0x3_0000_0000, 0x4_0000_0000, 0x5_0000_0000, 0x6_0000_0000)
        if step % 1000 == 999:
            p.record_gc_start(0)
            p.record_gc_end(0, 100, 0)
        if step % 5000 == 4999:
            p.track_snapshot()
        p.step()
    recorded = p.next_seq
    storage = p.storage
    p.close()  # hands the last events over and closes the storage
    storage.wait()  # until the writer has turned every chunk into rows
    os.replace(tmp, path)
    print(f"wrote {path}: {recorded:,} events, {steps:,} steps in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)


def _has_copies(path: str) -> bool:
    """Whether the cached trace keeps its chunks' copies (``event_columns``): one
    written before them measures the old reads, so it is written again."""
    from torchmem.storage import _event_reads, _sqlite_schema

    con = _sqlite_schema.connect(path)
    try:
        return _event_reads._copies_guarded(con)
    finally:
        con.close()


def trace_for(cache: str, label: str) -> str:
    os.makedirs(cache, exist_ok=True)
    path = os.path.join(cache, f"mlp-{label}.db")
    if not os.path.exists(path) or not _has_copies(path):
        write_trace(path, SIZES[label])
    return path


# -- measuring ----------------------------------------------------------------------
def measurements(path: str, out_dir: str) -> dict[str, list[str]]:
    py = sys.executable
    cli = [py, "-m", "torchmem"]
    q = "import torchmem, sys; p = torchmem.load(sys.argv[1]); "
    return {
        "startup": [py, "-c", "import torchmem, sys"],
        "load": [py, "-c", q],
        "statistics": [py, "-c", q + "p.get_statistics()"],
        "get_events, first": [py, "-c", q + "e = p.get_events(); e[0]; len(e)"],
        "get_events, all touched": [py, "-c", q + "sum(ev.size_bytes for ev in p.get_events())"],
        "leaks top 20": [py, "-c", q + "p.detect_potential_leaks(top=20)"],
        "sites of live": [py, "-c", "import torchmem, sys; from torchmem.analysis.sites import "
                          "group_by_site; group_by_site(torchmem.load(sys.argv[1]))"],
        "cli summary": cli + ["summary"],
        "cli leaks": cli + ["leaks"],
        "cli export html": cli + ["export", "-f", "html", "-o", os.path.join(out_dir, "r.html")],
        "cli export perfetto": cli + ["export", "-f", "perfetto", "-o",
                                      os.path.join(out_dir, "r.json")],
        "cli export memory_viz": cli + ["export", "-f", "memory_viz", "-o",
                                        os.path.join(out_dir, "r.pickle")],
        "cli export tensorboard": cli + ["export", "-f", "tensorboard", "-o",
                                         os.path.join(out_dir, "tb")],
    }


def run_once(cmd: list[str], path: str, timeout_s: float) -> tuple[float, float, float, int]:
    """(wall s, CPU s, peak RSS MiB, exit status) of one fresh process."""
    if cmd[1] == "-c":  # python -c CODE TRACE
        args = cmd + [path]
    else:  # python -m torchmem VERB TRACE [options]
        args = cmd[:4] + [path] + cmd[4:]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = t0 + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.005)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    if proc.returncode and err:
        print(f"    ({' '.join(args[1:4])}: exit {proc.returncode}: {err[-1][:200]})",
              flush=True)
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024.0, proc.returncode


def _spread(values: list[float], digits: int) -> str:
    return (f"{statistics.median(values):.{digits}f} "
            f"({min(values):.{digits}f}-{max(values):.{digits}f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1M,10M")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default=DEFAULT_CACHE)
    ap.add_argument("--only", default="", help="comma-separated measurement names")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per process")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    print(f"load average before: {os.getloadavg()}  ({os.cpu_count()} CPUs)", flush=True)
    with tempfile.TemporaryDirectory(prefix="torchmem-big-") as out_dir:
        for label in args.sizes.split(","):
            path = trace_for(args.cache, label)
            size_mb = os.path.getsize(path) / 2**20
            print(f"\n{label} events: {path} ({size_mb:.0f} MiB)", flush=True)
            print(f"  {'measurement':<24} {'wall s (median, range)':>24} "
                  f"{'CPU s (median, range)':>24} {'peak RSS MiB (median, range)':>30}")
            for name, cmd in measurements(path, out_dir).items():
                if only and name not in only:
                    continue
                walls, cpus, rss, bad = [], [], [], 0
                for _ in range(args.repeats):
                    w, c, r, rc = run_once(cmd, path, args.timeout)
                    walls.append(w)
                    cpus.append(c)
                    rss.append(r)
                    bad += rc != 0
                note = f"  ({bad} failed or timed out)" if bad else ""
                print(f"  {name:<24} {_spread(walls, 2):>24} {_spread(cpus, 2):>24} "
                      f"{_spread(rss, 0):>30}{note}  [load {os.getloadavg()[0]:.1f}]",
                      flush=True)
    print(f"\nload average after: {os.getloadavg()}", flush=True)


if __name__ == "__main__":
    main()
