"""Cost per step of the per-step category breakdowns: one breakdown(at=step) per
step (what the TensorBoard export did: quadratic in the run) against
step_category_breakdowns (one pass), on a short and a long run of the same
MLP + Adam. Flat per-step cost = the one pass grows linearly with the run.

    python benchmarks/step_categories.py [--short 50] [--long 800]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from _attribution_helpers import MLP, attributed, batches, train  # noqa: E402

from torchmem.analysis.breakdown import step_category_breakdowns  # noqa: E402


def run(steps: int) -> tuple[float, float]:
    with attributed() as p:
        data = batches((8, 16), 4, n=1) * steps
        train(MLP, lambda ps: torch.optim.Adam(ps, lr=1e-3), data, p)
        t0 = time.process_time()
        one = step_category_breakdowns(p)
        t1 = time.process_time()
        sample = sorted(one)[:: max(1, len(one) // 20)]  # per-call cost, sampled
        for s in sample:
            assert p.breakdown(by="category", at=s) == one[s]
        t2 = time.process_time()
        return (t1 - t0) / len(one) * 1e6, (t2 - t1) / len(sample) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=50)
    ap.add_argument("--long", type=int, default=800)
    a = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}; CPU time per step (us)")
    for n in (a.short, a.long):
        one, each = run(n)
        print(f"{n:6d} steps: one pass {one:9.0f} /step   breakdown(at=step) {each:9.0f} /call")


if __name__ == "__main__":
    main()
