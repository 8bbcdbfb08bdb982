"""What a captured stack costs at a real depth: 3, 10 and 30 Python frames.

benchmarks/track_1m.py's "depth 10" captures the frames its loop happens to
have (about 3); here the allocation loop runs at the bottom of a chain of
distinct functions (one code object each, in a file outside torchmem), so
the stack captured really is that deep (checked: every stack resolves to
the depth asked, capped by ``max_stack_trace_depth``).

Stacks are cut at ``max_stack_trace_depth`` = the depth.
Patterns, ``--n`` allocate/free pairs each (addresses reused):
  same line: every allocation from one line (one stack for the whole loop),
  4 lines: the innermost frame cycles over 4 lines (4 stacks; the outer
      frames do not change, as in a training step's inner loop),
  outer moves: the frame above the loop alternates between 2 call sites
      every 64 pairs (the outer frames change too).
Stacks are walked two ways, both timed: the interpreter's frames (CPython
3.11, csrc/frame_walk.cpp) and frame objects (PyEval_GetFrame /
PyFrame_GetBack, every other version; the baseline).
Cost per captured allocation = (CPU time with stacks - without) / pairs,
``time.thread_time`` of this thread, best of ``--repeat``, both measured in
the same run. Thread CPU time, not wall time: the machine is shared.

Run: python benchmarks/stack_depth.py [--n 200000] [--repeat 5] [--depths 3,10,30]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torchmem

LOOP = """
def run(alloc, free, n, pattern):
    a = 0x7F0000000000
    if pattern == "same line":
        for i in range(n):
            alloc(a, 256)
            free(a)
    elif pattern == "4 lines":
        for i in range(n // 4):
            alloc(a, 256)
            free(a)
            alloc(a, 256)
            free(a)
            alloc(a, 256)
            free(a)
            alloc(a, 256)
            free(a)
    else:
        for i in range(n):
            alloc(a, 256)
            free(a)
"""


def build_chain(depth: int):
    """A callable whose loop runs ``depth`` Python frames deep (the loop's own frame
    included), every frame a distinct code object in a file of its own name."""
    ns: dict = {}
    exec(compile(LOOP, "/bench/loop.py", "exec"), ns)
    inner = ns["run"]
    for level in range(depth - 2):
        src = (f"def f{level}(alloc, free, n, pattern):\n"
               f"    if pattern == 'outer moves':\n"
               f"        for k in range(n // 64):\n"
               f"            if k % 2:\n"
               f"                inner(alloc, free, 64, pattern)\n"
               f"            else:\n"
               f"                inner(alloc, free, 64, pattern)\n"
               f"        return\n"
               f"    inner(alloc, free, n, pattern)\n") if level == 0 else (
            f"def f{level}(alloc, free, n, pattern):\n"
            f"    inner(alloc, free, n, pattern)\n")
        g = {"inner": inner}
        exec(compile(src, f"/bench/level{level}.py", "exec"), g)
        inner = g[f"f{level}"]
    return inner  # + this module's caller frame = depth


def timed(prof, chain, n: int, pattern: str) -> float:
    gc.collect()
    gc.disable()
    try:
        t = time.thread_time()
        chain(prof.track_allocation, prof.track_deallocation, n, pattern)
        return time.thread_time() - t
    finally:
        gc.enable()


def measure(depth: int, pattern: str, n: int, repeat: int) -> tuple[float, dict[str, float], int]:
    """Best thread CPU seconds without stacks, and with them per walk (the
    interpreter's frames where this Python has them, frame objects)."""
    from torchmem import _native

    chain = build_chain(depth)
    best_off = float("inf")
    walks = {w: float("inf") for w in ("interpreter frames", "frame objects")}
    got = 0
    for _ in range(repeat):  # alternating, so drift hits every configuration alike
        off = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=False,
                                      retention_events=1 << 16)
        best_off = min(best_off, timed(off, chain, n, pattern))
        off.close()
        for walk in walks:
            if _native.stack_walk(walk == "interpreter frames") != walk:
                continue  # this Python walks frame objects only
            on = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True,
                                         max_stack_trace_depth=depth,
                                         retention_events=1 << 16)
            walks[walk] = min(walks[walk], timed(on, chain, n, pattern))
            rows = on.read_rows()
            got = len(on.resolve_stack(int(rows["stack_id"][0])).frames)
            on.close()
    _native.stack_walk(True)
    return best_off, {w: t for w, t in walks.items() if t != float("inf")}, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--depths", default="3,10,30")
    args = ap.parse_args()
    print(f"torchmem {torchmem.__version__}, Python {sys.version.split()[0]}, {args.n} pairs, "
          f"best of {args.repeat}, thread CPU time, load average {os.getloadavg()[0]:.1f}")
    print(f"\n{'depth':>5} {'pattern':12} {'frames':>6} {'no stacks':>10}   "
          "ns per captured allocation: interpreter frames / frame objects (the baseline)")
    for depth in (int(d) for d in args.depths.split(",")):
        for pattern in ("same line", "4 lines", "outer moves"):
            off, walks, got = measure(depth, pattern, args.n, args.repeat)
            cost = {w: (t - off) / args.n * 1e9 for w, t in walks.items()}
            cells = " / ".join(f"{cost[w]:5.0f}" if w in cost else "    -"
                               for w in ("interpreter frames", "frame objects"))
            print(f"{depth:5d} {pattern:12} {got:6d} {off * 1e3:8.1f}ms   {cells}")
    print(f"(load average at the end {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
