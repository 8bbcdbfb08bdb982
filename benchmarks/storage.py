"""SQLite storage throughput and its cost per tracked event.

    python benchmarks/storage.py [--events N] [--repeats R] [--thread] [--work K] [--control]

Prints:
- sustained events/s the SQLite writer stores (N events handed over at
  once, timed until a flush handshake says they are committed): from the
  recorder (column chunks, the pump's path without a publisher) and as rows
  (the path with a publisher);
- the time per tracked event (track_allocation + track_deallocation pairs,
  addresses reused) with in-memory only vs SQLite on:
  * loop wall: what the training thread takes while it runs (the writer
    works in its own process, the pump in its own thread);
  * loop CPU: the training thread's own CPU time (time.thread_time), which
    leaves out time spent waiting for the GIL or descheduled by other load;
  * end to end: loop + close, until every event is committed;
  * expansion: how long the writer still runs after close, turning the
    event chunks it stored into ``events`` rows (the training process does
    not wait for it unless asked), in one untimed run; the timed runs kill
    the writer once close() has everything committed, so pairs of runs
    follow each other within seconds;
  * writer CPU until close: CPU seconds the writer child used (getrusage of
    reaped children).
  Goal: loop wall with SQLite <= 1.10x in-memory (the paired median: run i
  of each configuration runs back to back, and their ratio is taken).
``--control`` adds a second in-memory configuration, compared with the
first like SQLite is: how far apart this machine puts two identical runs.
``--mlp`` instead times a real training loop: the small MLP of
benchmarks/host_overhead.py (77 CPU allocations per step), recorded by the
CPU allocator hook into a profiler in memory vs with SQLite on; step time
(wall) and the ratio, paired as above.
Runs alternate between the configurations (R each, every other round in
reverse order) so drifting machine load hits both alike; best and median
are printed. The default 6M events keep the
loop long (~0.7 s) against the pump's 200 ms hand-over, so the figures show
the steady state, not a loop that ends before the writer starts. ``--thread`` adds the
in-process writer thread (the fallback, and the design before the child).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import tempfile
import time

import torchmem
from torchmem.storage import SQLiteStorage


def _track(p, n: int, work: int = 0) -> tuple[float, float]:
    """(wall s, thread CPU s) of n tracked events, with ``work`` Python loop turns per pair."""
    ta, td = p.track_allocation, p.track_deallocation
    c0, t0 = time.thread_time(), time.perf_counter()
    if work:
        turns = range(work)
        for i in range(n // 2):
            a = 0x10000 + (i & 1023) * 64
            ta(a, 64)
            td(a)
            for _ in turns:  # the training step's own Python work
                pass
    else:
        for i in range(n // 2):
            a = 0x10000 + (i & 1023) * 64
            ta(a, 64)
            td(a)
    return time.perf_counter() - t0, time.thread_time() - c0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_tracking(n: int, mode: str, directory: str, work: int = 0,
                 expand: bool = True) -> dict[str, float]:
    """One run: loop wall/CPU, end-to-end seconds and writer CPU for n events.

    ``expand=False`` kills the writer once close() says every event is
    committed, instead of waiting ~3 us per event while it turns chunks into
    rows: runs then follow each other in seconds, not minutes, so pairs see
    the same machine. The trace stays whole (chunks are read like rows).
    """
    storage = None
    if not mode.startswith("memory"):
        storage = SQLiteStorage(os.path.join(directory, f"t{time.monotonic_ns()}.db"),
                                _in_process=mode == "thread")
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    cpu0 = _children_cpu()
    proc0, thread0 = time.process_time(), time.thread_time()
    t0 = time.perf_counter()
    loop, loop_cpu = _track(p, n, work)
    p.close()  # returns once everything is committed (in chunks or rows)
    end = time.perf_counter() - t0
    # CPU of the training process's other threads (pump, sender) until close.
    others = (time.process_time() - proc0) - (time.thread_time() - thread0)
    tail = 0.0
    if storage is not None:
        assert storage.events_written == n, (storage.events_written, n)
        t1 = time.perf_counter()
        if not expand and storage.writer_pid is not None:
            os.kill(storage.writer_pid, signal.SIGKILL)
        storage.wait()  # the writer expanding what is left into events rows
        tail = time.perf_counter() - t1
    return {"loop": loop, "cpu": loop_cpu, "end": end, "tail": tail,
            "writer": _children_cpu() - cpu0, "others": others}


def run_mlp(steps: int, mode: str, directory: str) -> dict[str, float]:
    """Seconds per training step of a small MLP recorded by the CPU allocator hook."""
    import torch

    from torchmem.sources.cpu_allocator import CPUAllocatorHook

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))
    storage = None
    if mode != "memory":
        storage = SQLiteStorage(os.path.join(directory, f"m{time.monotonic_ns()}.db"))
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    with CPUAllocatorHook(p):
        c0, t0 = time.thread_time(), time.perf_counter()
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            p.step()
        loop, cpu = time.perf_counter() - t0, time.thread_time() - c0
    events = p.next_seq
    p.close()
    if storage is not None:
        storage.wait()
    return {"loop": loop / steps, "cpu": cpu / steps, "events_per_s": events / loop}


def mlp_main(steps: int, repeats: int) -> None:
    import torch

    torch.set_num_threads(1)
    runs: dict[str, list[dict[str, float]]] = {"memory": [], "child": []}
    with tempfile.TemporaryDirectory() as d:
        for mode in runs:  # warm-up: torch's lazy initialisation, the hook's build
            run_mlp(20, mode, d)
        for k in range(repeats):
            for mode in (list(runs) if k % 2 == 0 else list(runs)[::-1]):
                runs[mode].append(run_mlp(steps, mode, d))
    rate = statistics.median(x["events_per_s"] for x in runs["child"])
    print(f"small MLP training, {steps} steps x {repeats} runs each, interleaved; "
          f"{rate / 1e3:,.0f} k events/s recorded:")
    for mode, rs in runs.items():
        print(f"  {mode:7s} step wall best {min(x['loop'] for x in rs) * 1e3:.3f} median "
              f"{statistics.median(x['loop'] for x in rs) * 1e3:.3f} ms; step CPU median "
              f"{statistics.median(x['cpu'] for x in rs) * 1e3:.3f} ms")
    for key, label in (("loop", "step wall"), ("cpu", "step CPU")):
        print(f"  added cost, SQLite on, {label}: {_paired(runs['memory'], runs['child'], key)}"
              + ("; goal <= +10%" if key == "loop" else ""))


def writer_throughput(n: int, directory: str, mode: str = "child",
                      path: str = "recorder") -> float:
    """Events per second SQLiteStorage commits, handed n events at once: straight from
    the recorder (``path="recorder"``, what the pump does without a publisher:
    column chunks) or as a delta of rows (``"rows"``, with a publisher)."""
    p = torchmem.MemoryProfiler(auto_snapshot=False, retention_events=n + 1)
    _track(p, n)
    cursors: dict = {}
    delta = p.sink_delta(cursors, with_events=path == "rows")
    storage = SQLiteStorage(os.path.join(directory, f"w{time.monotonic_ns()}.db"),
                            _in_process=mode == "thread")
    t0 = time.perf_counter()
    if path == "rows":
        storage.append(delta)
    else:
        storage.append_from_recorder(p, 0, n, delta)
    storage.flush(timeout=None)
    dt = time.perf_counter() - t0
    total = storage.events_written
    storage.close()
    p.close()
    assert total == n, (total, n)
    return total / dt


def _paired(base: list[dict[str, float]], runs: list[dict[str, float]], key: str) -> str:
    """The median (and quartiles) of run i's ``key`` over base run i's, as added %.

    Run i of each configuration ran back to back: the ratio within a pair
    cancels most of the machine's drift between pairs.
    """
    ratios = [r[key] / b[key] for b, r in zip(base, runs)]
    mid = statistics.median(ratios)
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [mid] * 3
    return (f"paired median {(mid - 1) * 100:+.1f}% "
            f"(quartiles {(q1 - 1) * 100:+.1f}% .. {(q3 - 1) * 100:+.1f}%)")


def _fmt(values: list[float], n: int) -> str:
    best, med = min(values), statistics.median(values)
    return f"best {best / n * 1e9:6.1f} median {med / n * 1e9:6.1f} ns/event"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=6_000_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--thread", action="store_true",
                    help="also measure the in-process writer thread")
    ap.add_argument("--work", type=int, default=0,
                    help="Python loop turns between event pairs: a paced loop the writer "
                         "can keep up with (e.g. 60 with --events 1000000), where an "
                         "in-process writer competes for the GIL")
    ap.add_argument("--control", action="store_true",
                    help="also run the in-memory configuration a second time, compared "
                         "like SQLite: the spread this machine gives two identical runs")
    ap.add_argument("--mlp", type=int, default=0, metavar="STEPS",
                    help="time STEPS training steps of a small MLP instead (e.g. 2000)")
    args = ap.parse_args()
    if args.mlp:
        mlp_main(args.mlp, args.repeats)
        return
    n, r = args.events, args.repeats
    modes = (["memory"] + (["memory-again"] if args.control else []) + ["child"]
             + (["thread"] if args.thread else []))
    stored = [m for m in modes if not m.startswith("memory")]
    with tempfile.TemporaryDirectory() as d:
        for mode in stored:
            for path in ("recorder", "rows"):
                rates = [writer_throughput(n, d, mode, path) for _ in range(3)]
                print(f"SQLite writer ({mode}, from the {path}), sustained: best "
                      f"{max(rates) / 1e3:,.0f} k events/s, median "
                      f"{statistics.median(rates) / 1e3:,.0f} k events/s "
                      f"({1e9 / max(rates):,.0f} ns per stored event at best)")
        runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        tails = {mode: run_tracking(n, mode, d, args.work)["tail"] for mode in stored}
        for k in range(r):
            # Every other round in reverse: a run that gains or loses from
            # the one before it does so in both configurations alike.
            for mode in (modes if k % 2 == 0 else modes[::-1]):
                runs[mode].append(run_tracking(n, mode, d, args.work, expand=False))
    print(f"{n:,} tracked events (alloc/free pairs, {args.work} Python loop turns between "
          f"pairs), {r} runs each, interleaved:")
    for mode in modes:
        rs = runs[mode]
        print(f"  {mode:7s} loop wall {_fmt([x['loop'] for x in rs], n)}; "
              f"loop CPU {_fmt([x['cpu'] for x in rs], n)}")
        print(f"  {'':7s} CPU of the process's other threads (pump, sender): median "
              f"{statistics.median(x['others'] for x in rs) / n * 1e9:.1f} ns/event")
        print(f"  {'':7s} end to end {_fmt([x['end'] for x in rs], n)}; writer CPU until "
              f"close {statistics.median(x['writer'] for x in rs) / n * 1e9:.0f} ns/event "
              f"(median)" + (f"; then expanding chunks into rows: {tails[mode]:.1f} s "
                             f"(a run before the timed ones)" if mode in tails else ""))
    mem = runs["memory"]
    for mode in modes[1:]:
        rs = runs[mode]
        for key, label in (("loop", "loop wall"), ("cpu", "loop CPU")):
            m_best, s_best = min(x[key] for x in mem), min(x[key] for x in rs)
            m_med = statistics.median(x[key] for x in mem)
            s_med = statistics.median(x[key] for x in rs)
            print(f"  added cost, {mode}, {label}: {_paired(mem, rs, key)}; "
                  f"best {(s_best / m_best - 1) * 100:+.1f}% "
                  f"({(s_best - m_best) / n * 1e9:+.1f} ns/event), median "
                  f"{(s_med / m_med - 1) * 100:+.1f}% ({(s_med - m_med) / n * 1e9:+.1f} ns/event)"
                  + ("; goal <= +10%" if key == "loop" and mode in stored else ""))


if __name__ == "__main__":
    main()
