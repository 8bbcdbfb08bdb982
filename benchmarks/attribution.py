"""What attribution costs: per module call and per allocation, against attribution off
and against torch's MemTracker, on a CPU MLP and a deeper model.

Configurations, each a training step (forward, backward, Adam step) timed the same way:
  (off)   torchmem recording through the CPU allocator hook, attribution off;
  (hooks) "off" plus two empty global module hooks: torch's own price for any
          global forward hook (nn.Module.__call__ leaves its fast path), which
          attribution paid until it wrapped nn.Module.__call__ instead;
  (on)    "off" with attribution (torchmem.sources.context, its C++ paths);
  (mt)    torch.distributed._tools.mem_tracker.MemTracker (a dispatch mode) alone.
Printed: step time (thread CPU time, median of the steps, median and spread
over --repeats rounds run in rotating order), and (x - off) divided by the
module calls of a step: microseconds per module call.

Per allocation: the recorder stamps every event with the thread's context
whether attribution is on or not (one load and two 2-byte stores, measured
with callgrind in docs/performance.md); what attribution adds per allocation
is only where an allocation happens, not how: the "alloc" rows time 20,000
``torch.empty`` + free pairs under a module forward with attribution on and
off (the hooks run once for the whole loop).

    python benchmarks/attribution.py [--steps 30] [--repeats 5] [--threads 1]
    python benchmarks/attribution.py --instructions   # needs valgrind; ~15 min
    python benchmarks/attribution.py --alternate 200  # configurations every step

Times on a shared machine move with its load; ``--instructions`` counts
instead: each configuration runs the deep model's forward (no grad, and
forward + backward) in a child under ``valgrind --tool=callgrind
--instr-atstart=no``, which counts instructions only around 4 iterations
after 2 of warm-up; the difference to "off" divided by the module calls is
the cost per module call, the same on any load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

from torchmem import MemoryProfiler
from torchmem.sources.context import ContextSource
from torchmem.sources.cpu_allocator import CPUAllocatorHook


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                         nn.Linear(256, 10))


class Deep(nn.Module):
    """48 residual blocks of LayerNorm, Linear, GELU, Linear: 241 module calls a forward."""

    def __init__(self, blocks: int = 48, d: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            for _ in range(blocks))
        self.head = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


def module_calls(model: nn.Module, x: torch.Tensor) -> int:
    n = 0

    def count(*_):
        nonlocal n
        n += 1

    h = torch.nn.modules.module.register_module_forward_pre_hook(count)
    with torch.no_grad():
        model(x)
    h.remove()
    return n


@contextlib.contextmanager
def empty_hooks():
    from torch.nn.modules.module import (register_module_forward_hook,
                                         register_module_forward_pre_hook)

    a = register_module_forward_pre_hook(lambda m, i: None)
    b = register_module_forward_hook(lambda m, i, o: None, always_call=True)
    try:
        yield
    finally:
        a.remove()
        b.remove()


def _native_paths(name: str) -> None:
    """For "on": the C++ paths built first, not the Python fallback until they are."""
    if name == "on":
        from torchmem.sources.context import build_autograd_hooks

        build_autograd_hooks(wait_s=300)


@contextlib.contextmanager
def configuration(name: str, model: nn.Module, opt: torch.optim.Optimizer):
    if name == "mt":
        from torch.distributed._tools.mem_tracker import MemTracker

        mt = MemTracker()
        mt.track_external(model, opt)
        with mt:
            yield mt.reset_mod_stats  # it refuses a second iteration without
        return
    _native_paths(name)
    prof = MemoryProfiler(auto_snapshot=False)
    with CPUAllocatorHook(prof, adopt_existing=False):
        if name == "off":
            yield None
        elif name == "hooks":
            with empty_hooks():
                yield None
        else:
            with ContextSource(prof):
                yield None
    prof.close()


def step_times(make, shape, name: str, steps: int) -> dict[str, float]:
    """Thread CPU seconds of a training step, a forward+backward and a no-grad
    forward: the minimum over ``steps`` of each (the sample least disturbed by
    the machine's other load) and the median."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    times: dict[str, list[float]] = {"step": [], "fwd+bwd": [], "fwd": []}
    with configuration(name, model, opt) as between_steps:
        for i in range(steps + 3):
            if between_steps is not None:
                between_steps()
            t = time.thread_time()
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            t1 = time.thread_time()
            if between_steps is not None:
                between_steps()
            t1b = time.thread_time()
            nn.functional.cross_entropy(model(x), y).backward()
            t2 = time.thread_time()
            if between_steps is not None:
                between_steps()
            t2b = time.thread_time()
            with torch.no_grad():
                model(x)
            t3 = time.thread_time()
            if i >= 3:  # warm-up: Adam's state, the hook's first-forward marks
                times["step"].append(t1 - t)
                times["fwd+bwd"].append(t2 - t1b)
                times["fwd"].append(t3 - t2b)
    return {k: min(v) for k, v in times.items()} | {k + " median": statistics.median(v)
                                                    for k, v in times.items()}


def alloc_loop(name: str, n: int = 20_000) -> float:
    """Seconds per torch.empty + free pair inside one module forward."""

    class Allocating(nn.Module):
        def forward(self, x):
            t = time.thread_time()
            for _ in range(n):
                torch.empty(256)
            return x, (time.thread_time() - t) / n

    prof = MemoryProfiler(auto_snapshot=False)
    with CPUAllocatorHook(prof, adopt_existing=False):
        source = ContextSource(prof).start() if name == "on" else None
        with torch.no_grad():
            _, per = Allocating()(torch.zeros(1))
        if source is not None:
            source.stop()
    prof.close()
    return per


def step_end_marks(make, shape, rounds: int = 7, n: int = 200) -> dict[str, float]:
    """Thread CPU seconds of attribution's work at an optimizer step's end (the
    step post-hook: every parameter, gradient, buffer and state tensor marked,
    the new marks sent), with the C marks (tensor_marks.cpp) and with the
    Python ones, alternating in one process: best of ``rounds`` means of ``n``."""
    from torchmem.sources import _marks, context

    torch.manual_seed(0)
    model, x = make(), torch.randn(*shape)
    opt = torch.optim.Adam(model.parameters())
    prof = MemoryProfiler(auto_snapshot=False)
    out = {"C": float("inf"), "Python": float("inf")}
    with CPUAllocatorHook(prof, adopt_existing=False), ContextSource(prof):
        if context.build_autograd_hooks(wait_s=300) != "native":
            return {}
        native = _marks._native
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(x).sum().backward()
            opt.step()
        try:
            for r in range(2 * rounds):
                which = "C" if r % 2 == 0 else "Python"
                _marks.use_native_marks(native if which == "C" else None)
                t = time.thread_time()
                for _ in range(n):
                    context._hooks.step_post(opt, (), {})
                out[which] = min(out[which], (time.thread_time() - t) / n)
        finally:
            _marks.use_native_marks(native)
    prof.close()
    return out


def alternating(make, shape, steps: int) -> dict[str, dict[str, list[float]]]:
    """Thread CPU seconds of a training step, a forward+backward and a no-grad
    forward with "off", "hooks" and "on" switched every step in one process
    (one profiler and allocator hook throughout), so that the machine's drift
    hits all three alike: ``steps`` samples of each."""
    from torchmem.sources.context import build_autograd_hooks

    build_autograd_hooks(wait_s=300)
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.Adam(model.parameters())
    x = torch.randn(*shape)
    y = torch.randint(0, 10, (shape[0],))
    names = ("off", "hooks", "on")
    out = {n: {"step": [], "fwd+bwd": [], "fwd": []} for n in names}
    prof = MemoryProfiler(auto_snapshot=False)
    source = ContextSource(prof)
    with CPUAllocatorHook(prof, adopt_existing=False):
        for i in range(3 * (steps + 2)):
            name = names[i % 3]
            with contextlib.ExitStack() as stack:
                if name == "on":
                    stack.enter_context(source)
                elif name == "hooks":
                    stack.enter_context(empty_hooks())
                t0 = time.thread_time()
                opt.zero_grad(set_to_none=True)
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                t1 = time.thread_time()
                nn.functional.cross_entropy(model(x), y).backward()
                t2 = time.thread_time()
                with torch.no_grad():
                    model(x)
                t3 = time.thread_time()
            if i >= 6:  # warm-up: Adam's state, the first forward's marks
                out[name]["step"].append(t1 - t0)
                out[name]["fwd+bwd"].append(t2 - t1)
                out[name]["fwd"].append(t3 - t2)
    prof.close()
    return out


def print_alternating(steps: int) -> None:
    print(f"configurations switched every step, {steps} steps each: us per module call "
          "over off, best / median")
    for label, (make, shape) in {"mlp": (mlp, (32, 64)), "deep": (Deep, (64, 32))}.items():
        calls = module_calls(make(), torch.randn(*shape))
        t = alternating(make, shape, steps)
        for n in ("hooks", "on"):
            cells = []
            for k in ("step", "fwd+bwd", "fwd"):
                best = (min(t[n][k]) - min(t["off"][k])) / calls * 1e6
                med = (statistics.median(t[n][k]) - statistics.median(t["off"][k])) / calls * 1e6
                cells.append(f"{k} {best:6.2f} / {med:6.2f}")
            print(f"  {label:>4} ({calls:3d} calls) {n:>5}: " + "   ".join(cells))


def _counted_iterations(name: str, grad: bool) -> None:
    """The child of --instructions: 2 warm-up iterations, then callgrind counts
    1 iteration (dump 1) and 4 more (dump 2)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x = Deep(), torch.randn(64, 32)

    def ctl(*a: str) -> None:
        subprocess.run(["callgrind_control", *a, str(os.getpid())], capture_output=True)
        time.sleep(0.5)

    def it() -> None:
        with torch.set_grad_enabled(grad):
            y = model(x)
        if grad:
            y.sum().backward()

    _native_paths(name)
    prof = MemoryProfiler(auto_snapshot=False)
    with CPUAllocatorHook(prof, adopt_existing=False):
        ctx = (empty_hooks() if name == "hooks" else ContextSource(prof) if name == "on"
               else contextlib.nullcontext())
        with ctx:
            it()
            it()
            ctl("-i", "on")
            it()
            ctl("-d")
            for _ in range(4):
                it()
            ctl("-d")


def instructions() -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind")
    calls = module_calls(Deep(), torch.randn(64, 32))
    print(f"deep model, {calls} module calls per forward: instructions per iteration "
          "(callgrind, 4 iterations)")
    per: dict[tuple[str, bool], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for grad in (False, True):
            for name in ("off", "hooks", "on"):
                out = os.path.join(tmp, f"{name}-{grad}.out")
                subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no",
                                f"--callgrind-out-file={out}", sys.executable, __file__,
                                "--child", name, "grad" if grad else "nograd"],
                               capture_output=True, check=True)
                text = open(out + ".2").read()
                per[name, grad] = int(re.search(r"^summary: (\d+)", text, re.M).group(1)) / 4
    for grad in (False, True):
        base = per["off", grad]
        print(f"\n{'forward + backward' if grad else 'forward (no grad)'}:")
        for name in ("off", "hooks", "on"):
            extra = (per[name, grad] - base) / calls
            print(f"  {name:>5}: {per[name, grad] / 1e6:8.2f} M   {extra:8.0f} per module call "
                  f"over off")
    print("\n(hooks: torch's own price for any global module hook, which attribution no "
          "longer pays)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--instructions", action="store_true",
                    help="count instructions per module call with callgrind instead")
    ap.add_argument("--alternate", type=int, metavar="STEPS", default=0,
                    help="switch off / hooks / on every step in one process instead")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _counted_iterations(args.child[0], args.child[1] == "grad")
    if args.instructions:
        return instructions()
    if args.alternate:
        torch.set_num_threads(args.threads)
        return print_alternating(args.alternate)
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}")
    models = {"mlp": (mlp, (32, 64)), "deep": (Deep, (64, 32))}
    names = ("off", "hooks", "on", "mt")
    for label, (make, shape) in models.items():
        calls = module_calls(make(), torch.randn(*shape))
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for r in range(args.repeats):
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                if n == "mt" and label == "deep" and r > 0:
                    continue  # ~100x slower; one round says enough
                runs[n].append(step_times(make, shape, n, args.steps))
        print(f"\n{label}: {calls} module calls per forward; thread CPU ms, best of "
              f"{args.steps} x {args.repeats} rounds (median of the round medians)")
        print(f"{'config':>6} " + " ".join(f"{k:>21}" for k in ("step", "fwd+bwd", "fwd"))
              + f" {'us/call fwd+bwd':>16} {'us/call fwd':>12}")
        best = {n: {k: min(r[k] for r in runs[n]) for k in runs[n][0]} for n in names}
        med = {n: {k: statistics.median(r[k + " median"] for r in runs[n])
                   for k in ("step", "fwd+bwd", "fwd")} for n in names}
        for n in names:
            cells = " ".join(f"{best[n][k] * 1e3:10.3f} ({med[n][k] * 1e3:8.3f})"
                             for k in ("step", "fwd+bwd", "fwd"))
            per = [(best[n][k] - best["off"][k]) / calls * 1e6 for k in ("fwd+bwd", "fwd")]
            print(f"{n:>6} {cells} {per[0]:16.2f} {per[1]:12.2f}")
        ends = step_end_marks(make, shape)
        if ends:
            tensors = 4 * sum(1 for _ in make().parameters())  # parameter, gradient, Adam's two
            print(f"  the optimizer step's end (marks of ~{tensors} tensors): C "
                  f"{ends['C'] * 1e6:.1f} us, Python {ends['Python'] * 1e6:.1f} us a step "
                  f"({(ends['Python'] - ends['C']) / calls * 1e6:.2f} us per module call less)")
    pairs = {"off": [], "on": []}
    for r in range(args.repeats):
        for n in (("off", "on") if r % 2 == 0 else ("on", "off")):
            pairs[n].append(alloc_loop(n))
    print("\nper allocation (torch.empty + free inside a forward):")
    for n, v in pairs.items():
        print(f"  attribution {n:>3}: {statistics.median(v) * 1e9:7.0f} ns "
              f"(spread {min(v) * 1e9:.0f}-{max(v) * 1e9:.0f})")


if __name__ == "__main__":
    main()
