"""The holder search on a process with 1M live Python objects, against gc.collect() on the same heap.

A full collection walks every tracked object once, as the search does at most,
so its time (measured in the same run, on the same heap) is the baseline the
ratios are against. Scenarios (the leaked tensors and where they sit):

- shallow: 100 tensors in a module global list (``history[i]``, depth 2): the
  common leak; the walk stops once they are found.
- deep: one tensor at the far end of the 1M-object structure: nearly the
  whole heap is walked before it is found.
- graph: 20 losses kept with their graphs; the leaked memory is the saved
  activations, reached through ``grad_fn`` and the nodes.
- nothing: an address no Python object owns: the whole heap, then the GC's
  unreached objects, are searched before "no Python object holds it".

Then the epoch check itself on the same heap, a loop keeping its losses with
their graphs: ``mark_epoch`` with and without the holder search, alternated.

Each figure is the median of --repeat runs with the quartiles; wall and CPU
time both, since the machine may be shared (the load average is printed).

    python benchmarks/holders.py [--objects 1000000] [--repeat 5] [--budget 2]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

import torchmem
from torchmem.analysis.holders import find_holders
from torchmem.epoch import mark_epoch
from torchmem.sources.host import HostTracker

FULL_BUDGET_S = 120.0  # long enough for any scenario to finish: its whole cost

history: list = []
losses: list = []
heap: list = []


class Record:
    """A small user object, as a dataset index or a log would keep millions of."""

    def __init__(self, i: int, parent: "Record | None") -> None:
        self.i = i
        self.tags = [i]
        self.parent = parent


def build_heap(n: int) -> None:
    """About ``n`` tracked objects: chains of Records (each with a list), 1000 chains."""
    heap.clear()
    per_chain = max(1, n // 2 // 1000)  # a Record and its list: two tracked objects
    for c in range(1000):
        prev = None
        for i in range(per_chain):
            prev = Record(c * per_chain + i, prev)
        heap.append(prev)


def deepest_record() -> Record:
    r = heap[-1]
    while r.parent is not None:
        r = r.parent
    return r


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def scenario(name: str) -> dict[int, int]:
    history.clear()
    losses.clear()
    if name == "shallow":
        history.extend(torch.randn(64) for _ in range(100))
        return {ptr(t): t.nbytes for t in history}
    if name == "deep":
        t = torch.randn(64)
        deepest_record().tags.append(t)
        return {ptr(t): t.nbytes}
    if name == "graph":
        torch.manual_seed(0)
        lin = torch.nn.Linear(32, 32)
        targets = {}
        for _ in range(20):
            x = torch.randn(16, 32)
            losses.append(torch.relu(lin(x)).sum())
            targets[ptr(x)] = x.nbytes
        return targets
    if name == "nothing":
        return {0x10_0000_0000: 4096}
    raise ValueError(name)


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], statistics.median(xs), q[2]


def measure(fn, repeat: int) -> tuple[list[float], list[float], object]:
    walls, cpus, out = [], [], None
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return walls, cpus, out


def fmt(xs: list[float]) -> str:
    lo, mid, hi = quartiles(xs)
    return f"{mid * 1e3:8.0f} ms [{lo * 1e3:.0f}-{hi * 1e3:.0f}]"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objects", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0)
    args = ap.parse_args(argv)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} cpus, "
          f"load average {os.getloadavg()[0]:.2f}")
    build_heap(args.objects)
    gc.collect()
    tracked = len(gc.get_objects())
    print(f"{tracked:,} objects tracked by the GC (--objects {args.objects:,} plus the "
          f"interpreter's and torch's)")
    walls, cpus, _ = measure(lambda: gc.collect(), args.repeat)
    base = statistics.median(walls)
    print(f"{'gc.collect() (baseline)':<24} wall {fmt(walls)}  cpu {fmt(cpus)}")
    print(f"each search: the whole cost (budget {FULL_BUDGET_S:g} s), then one run with "
          f"--budget {args.budget:g} s")
    for name in ("shallow", "deep", "graph", "nothing"):
        targets = scenario(name)
        walls, cpus, search = measure(lambda: find_holders(targets, budget_s=FULL_BUDGET_S),
                                      args.repeat)
        bounded = find_holders(targets, budget_s=args.budget)
        print(f"{name:<24} wall {fmt(walls)}  cpu {fmt(cpus)}  "
              f"x{statistics.median(walls) / base:.1f} gc.collect  "
              f"{search.objects_visited:,} objects walked; "
              f"with the budget: {bounded.elapsed_s * 1e3:.0f} ms, "
              f"{'stopped early' if bounded.stopped_early else 'complete'}")
        print(f"{'':<24} {search.holders()[0].path[:110]}")
    epoch_check(args.repeat, args.budget)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def epoch_check(repeat: int, budget_s: float) -> None:
    """mark_epoch with holders off and on, alternated, each after 10 leaking steps."""
    prof = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    tracker = HostTracker(prof).start()
    try:
        torch.manual_seed(0)
        lin = torch.nn.Linear(64, 64)
        losses.clear()

        def leak() -> None:
            for _ in range(10):
                losses.append(torch.relu(lin(torch.randn(32, 64))).sum())

        leak()
        mark_epoch(prof)  # the baseline
        times: dict[bool, tuple[list[float], list[float]]] = {False: ([], []), True: ([], [])}
        result = None
        for _ in range(repeat):
            for holders in (False, True):
                leak()
                w, c = time.perf_counter(), time.process_time()
                r = mark_epoch(prof, holders=holders, holders_budget_s=budget_s)
                times[holders][0].append(time.perf_counter() - w)
                times[holders][1].append(time.process_time() - c)
                result = r if holders else result
        for holders in (False, True):
            walls, cpus = times[holders]
            print(f"{'epoch check, holders ' + ('on' if holders else 'off'):<24} "
                  f"wall {fmt(walls)}  cpu {fmt(cpus)}")
        print(f"{'':<24} {result.leaks[0].holders[0].format()[:110]}")
        print(f"{'':<24} {result.holder_search.note()}")
    finally:
        tracker.stop()
        prof.close()
        losses.clear()


if __name__ == "__main__":
    main()
