"""What host tracking costs: training-step time of a small and a medium MLP on CPU.

Configurations, each timed over the same steps:
  (a) nothing,
  (m) an empty TorchDispatchMode (the floor any dispatch-mode tracker pays),
  (b) torchmem's HostTracker (dispatch mode) feeding a MemoryProfiler,
  (h) torchmem's CPU allocator hook (the default host source), and (h+s)
      the same with Python stacks captured at each allocation,
  (c) torch.profiler.profile(profile_memory=True).
Prints the step time, the ratio to (a), and the microseconds added per
dispatched op ((x - a) / ops per step; ops counted with a counting dispatch
mode). Goal for the default host source: <= 10 us per op.

Step time is the thread's CPU time (time.thread_time), best of the repeats of
the median over steps: on a shared machine wall time mostly measures the
neighbours. torch runs one intra-op thread (--threads) so the step's CPU time
is all on this thread. --clock wall switches to wall-clock time.

Run: python benchmarks/host_overhead.py [--steps N] [--repeats R] [--threads T]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from torchmem import MemoryProfiler
from torchmem.sources.cpu_allocator import CPUAllocatorHook
from torchmem.sources.host import HostTracker, _ModeBase


class CountingMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


class EmptyMode(_ModeBase):
    """The same base as the tracker's mode (no per-op Dynamo wrapper), no work."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func._op(*args, **kwargs) if kwargs else func._op(*args)


def make(width: int, depth: int, batch: int, inputs: int, classes: int):
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = []
    d = inputs
    for _ in range(depth):
        layers += [torch.nn.Linear(d, width), torch.nn.ReLU()]
        d = width
    layers.append(torch.nn.Linear(d, classes))
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, inputs)
    y = torch.randint(0, classes, (batch,))

    def step():
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return step


CLOCK = time.thread_time


def timed(step, ctx_factory, steps: int) -> float:
    """Median seconds per step over ``steps`` steps run inside one context."""
    times = []
    clock = CLOCK
    with ctx_factory():
        for _ in range(steps):
            t = clock()
            step()
            times.append(clock() - t)
    return statistics.median(times)


def bench(name: str, step, steps: int, repeats: int) -> None:
    for _ in range(5):  # warm up: optimizer state, allocator, lazy inits
        step()
    counter = CountingMode()
    with counter:
        step()
    ops = counter.ops
    prof = MemoryProfiler(auto_snapshot=False)
    hooked = MemoryProfiler(auto_snapshot=False)
    hooked_stacks = MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    with CPUAllocatorHook(hooked):
        step()
    allocs = hooked.get_statistics().allocation_count
    configs = {
        "a nothing": contextlib.nullcontext,
        "m empty dispatch mode": EmptyMode,
        "b torchmem dispatch-mode tracker": lambda: HostTracker(prof),
        "h torchmem CPU allocator hook": lambda: CPUAllocatorHook(hooked),
        "h+s allocator hook, stacks on": lambda: CPUAllocatorHook(hooked_stacks),
        "c torch.profiler(profile_memory=True)": lambda: profile(
            activities=[ProfilerActivity.CPU], profile_memory=True),
    }
    results: dict[str, list[float]] = {k: [] for k in configs}
    for _ in range(repeats):  # interleaved, so drift hits every configuration alike
        for k, factory in configs.items():
            results[k].append(timed(step, factory, steps))
    base = min(results["a nothing"])
    print(f"\n{name}: {ops} dispatched ops and {allocs} CPU allocations per step, "
          f"{steps} steps x {repeats} repeats")
    print(f"  {'configuration':40s} {'step ms':>9s} {'ratio':>7s} {'us/op added':>12s}")
    for k, ts in results.items():
        t = min(ts)
        print(f"  {k:40s} {t * 1e3:9.3f} {t / base:7.2f} {(t - base) / ops * 1e6:12.2f}")
    for p in (prof, hooked, hooked_stacks):
        assert p.anomalies["total"] == 0, p.anomalies
        p.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.thread_time if args.clock == "cpu" else time.perf_counter
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}, {args.clock} clock, load average {load:.1f}")
    bench("small MLP (32-64-10, batch 16)", make(64, 1, 16, 32, 10), args.steps, args.repeats)
    bench("medium MLP (512x3 hidden, batch 64)", make(512, 3, 64, 512, 10),
          max(args.steps // 4, 10), args.repeats)


if __name__ == "__main__":
    main()
