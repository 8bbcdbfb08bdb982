"""Cost per step of the per-step category breakdowns: one breakdown(at=step) per
step (what the TensorBoard export and the framework callbacks did: quadratic
in the run) against step_category_breakdowns (the export's: the events read
a window at a time) and StepCategoryTracker (the callbacks': asked at each
step's end, it reads the events since its last call), on a short and a long
run of the same MLP + Adam. A flat per-step cost grows linearly with the run.

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

from torchmem.analysis.run_moments import step_category_breakdowns  # noqa: E402
from torchmem.analysis.category_tracker import StepCategoryTracker  # noqa: E402


def run(steps: int) -> tuple[float, float, float]:
    with attributed() as p:
        data = batches((8, 16), 4, n=1) * steps
        tracker, spent = StepCategoryTracker(p), [0.0]

        def at_step_end(model, opt, step):
            t = time.process_time()
            tracker.categories([step])
            spent[0] += time.process_time() - t

        train(MLP, lambda ps: torch.optim.Adam(ps, lr=1e-3), data, p, check=at_step_end)
        t0 = time.process_time()
        one = step_category_breakdowns(p)
        t1 = time.process_time()
        sample = sorted(one)[:: max(1, len(one) // 20)]  # per-call cost, sampled
        for s in sample:
            assert p.breakdown(by="category", at=s) == one[s]
        t2 = time.process_time()
        return ((t1 - t0) / len(one) * 1e6, (t2 - t1) / len(sample) * 1e6,
                spent[0] / steps * 1e6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--short", type=int, default=50)
    ap.add_argument("--long", type=int, default=800)
    a = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}; CPU time per step (us)")
    for n in (a.short, a.long):
        one, each, tracked = run(n)
        print(f"{n:6d} steps: windows {one:9.0f} /step   tracker {tracked:9.0f} /step   "
              f"breakdown(at=step) {each:9.0f} /call")


if __name__ == "__main__":
    main()
