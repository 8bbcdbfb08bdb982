"""Independent measures of live CPU tensor memory, for the host source tests."""

from __future__ import annotations

import gc
import warnings

import torch
from torch.profiler import ProfilerActivity, profile, record_function


def reachable_bytes() -> int:
    """Bytes of the distinct torch-owned CPU storages reachable from Python.

    Every tensor object the collector knows about, plus its ``.grad`` (a
    gradient lives in C++ and may have no Python object until read).
    """
    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated module attributes warn on isinstance
        objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objs:
        for t in (o, o.grad):
            if t is None or not t.is_cpu or t.layout != torch.strided:
                continue
            s = t.untyped_storage()
            if s.resizable():
                storages[s._cdata] = s.nbytes()
    return sum(storages.values())


def profiler_marks(tprof) -> dict[str, tuple[int, int]]:
    """For each record_function marker: (live bytes, peak bytes) from torch.profiler."""
    evs = sorted(tprof.profiler.kineto_results.events(), key=lambda e: e.start_ns())
    live = peak = 0
    marks = {}
    for e in evs:
        if e.name() == "[memory]":
            live += e.nbytes()
            peak = max(peak, live)
        elif e.name().startswith("mark_"):
            marks[e.name()] = (live, peak)
    return marks


def train_mlp_measured(prof, tracker, variant: str):
    """An MLP trained 20 steps with Adam (``variant``: "foreach" or "fused") inside
    ``tracker`` (a context manager feeding ``prof``) and torch.profiler.

    Returns (per step (current, peak, reachable bytes), torch.profiler's
    {mark: (live, peak)}, parameter count). Model and optimizer are deleted
    (and collected) before it returns.
    """
    torch.manual_seed(0)
    ours = []
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as tprof:
        with tracker:
            model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 10))
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, **{variant: True})
            for step in range(20):
                x = torch.randn(16, 32)
                y = torch.randint(0, 10, (16,))
                loss = torch.nn.functional.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                del x, y, loss
                with record_function(f"mark_{step}"):
                    pass
                s = prof.get_statistics_for_type("CPU")
                ours.append((s.current_usage_bytes, s.peak_usage_bytes, reachable_bytes()))
            n_params = sum(p.numel() for p in model.parameters())
            del model, opt
            gc.collect()
    return ours, profiler_marks(tprof), n_params


def check_mlp_adam(prof, tracker, variant: str, peak_shortfall: int = 0) -> None:
    """Trains the MLP of ``train_mlp_measured`` and asserts at every step: current
    CPU bytes equal the reachable storages and torch.profiler's live bytes,
    and the peak is torch.profiler's, short of it by at most
    ``peak_shortfall`` bytes (temporaries a tracker cannot see). At the end,
    params + grads + exp_avg + exp_avg_sq (float32) + the per-param step
    counters are live.
    """
    ours, marks, n_params = train_mlp_measured(prof, tracker, variant)
    for step, (current, peak, reachable) in enumerate(ours):
        t_live, t_peak = marks[f"mark_{step}"]
        assert current == reachable == t_live, step
        assert 0 <= t_peak - peak <= peak_shortfall, (step, peak, t_peak)
    assert ours[-1][0] == 4 * 4 * n_params + 4 * 4
