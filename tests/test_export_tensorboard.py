"""TensorBoard scalars, from a saved trace (torchmem export --format tensorboard) and from
the live profiler (torchmem.integrations.tensorboard), read back with EventAccumulator."""

from __future__ import annotations

import sys

import pytest
import torch

import torchmem
from torchmem import cli
from torchmem.analysis.categories import CATEGORIES
from torchmem.analysis.steps import step_memory
from torchmem.export.tensorboard import step_scalars
from torchmem.sources.host import HostTracker

from _optional import require

STEPS = 6
BASE_TAGS = {"torchmem/current_bytes", "torchmem/peak_bytes", "torchmem/current_bytes/CPU.host",
             "torchmem/peak_bytes/CPU.host", "torchmem/gc_time_ns", "torchmem/gc_count"}


def _scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    ea_mod = require("tensorboard.backend.event_processing.event_accumulator")
    ea = ea_mod.EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def _train(prof, steps=STEPS, after_step=None):
    model = torch.nn.Linear(32, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with HostTracker(prof):
        for _ in range(steps):
            model(torch.randn(16, 32)).sum().backward()
            opt.step()
            opt.zero_grad()
            prof.step()
            if after_step is not None:
                after_step()
    return model


@pytest.fixture
def trace(tmp_path):
    path = tmp_path / "run.db"
    prof = torchmem.MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False)
    _train(prof)
    prof.close()
    return path


def test_export_writes_every_step_of_every_tag(trace, tmp_path, capsys):
    require("tensorboard")
    out = tmp_path / "tb"
    assert cli.main(["export", str(trace), "--format", "tensorboard", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().err
    got = _scalars(out)
    prof = torchmem.load(trace)
    cats = {t for t in got if t.startswith("torchmem/category_bytes/")}
    assert set(got) - cats == BASE_TAGS
    # Attribution (issue 18): every category at every step; at each step's
    # peak they add up to that peak, exactly.
    assert cats == {f"torchmem/category_bytes/{c}" for c in CATEGORIES}
    for i, (step, peak) in enumerate(got["torchmem/peak_bytes"]):
        assert sum(got[t][i][1] for t in cats) == peak, step
    expected = list(step_memory(prof))
    # Steps 0..STEPS-1 each end with a step(); the step after the last holds
    # nothing but the loop's end.
    assert [r.step for r in expected] == list(range(len(expected))) and len(expected) >= STEPS
    for rec in expected:
        for tag, value in step_scalars(rec).items():
            # TensorBoard keeps float32: exact below 16 MiB, as here.
            assert got[tag][rec.step] == (rec.step, float(value)), (tag, rec.step)
    assert all(len(points) == len(expected) for points in got.values())


def test_category_tags_are_breakdown_at_each_step(trace, tmp_path):
    # The export computes every step's breakdown in one pass; the values are
    # breakdown(by="category", at=step)'s, every category at every step.
    require("tensorboard")
    from torchmem.analysis.steps import step_categories
    from torchmem.export import export_tensorboard

    prof = torchmem.load(trace)
    export_tensorboard(prof, tmp_path / "tb")
    got = _scalars(tmp_path / "tb")
    n = len(got["torchmem/peak_bytes"])
    want = {s: step_categories(prof, s) for s in range(n)}
    assert any(v for w in want.values() for v in w.values())
    for name in want[0]:
        assert got[f"torchmem/category_bytes/{name}"] == [(s, float(want[s][name]))
                                                          for s in range(n)], name


def test_export_without_tensorboard_is_one_line(trace, tmp_path, monkeypatch, capsys):
    for name in ("torch.utils.tensorboard", "tensorboard", "tensorboard.compat.proto",
                 "tensorboard.summary.writer.event_file_writer"):
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    assert cli.main(["export", str(trace), "-f", "tensorboard", "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("torchmem: error: the TensorBoard export needs the tensorboard package "
                   "(pip install torchmem[tensorboard])")


def test_live_callback_writes_each_step_as_it_ends(tmp_path):
    require("tensorboard")
    from torchmem.integrations.tensorboard import TensorBoardCallback, TorchmemCallback

    assert TensorBoardCallback is TorchmemCallback
    path = tmp_path / "run.db"
    prof = torchmem.MemoryProfiler(torchmem.SQLiteStorage(path), auto_snapshot=False)
    tb = TorchmemCallback(tmp_path / "live", profiler=prof, auto=False)
    written = []
    _train(prof, after_step=lambda: written.append(tb.update()))
    assert written == [1] * STEPS  # each step's scalars as soon as it ended
    tb.close()  # and the step in progress
    assert tb.steps_written == STEPS + 1
    prof.close()
    live = _scalars(tmp_path / "live")
    # Attribution (issue 18): every category at every step, beside the base tags.
    assert set(live) == BASE_TAGS | {f"torchmem/category_bytes/{c}" for c in CATEGORIES}
    assert all(len(points) == STEPS + 1 for points in live.values())
    # The same figures as the export of the trace, for every finished step.
    from torchmem.export import export_tensorboard

    export_tensorboard(torchmem.load(path), tmp_path / "saved")
    saved = _scalars(tmp_path / "saved")
    assert set(saved) == set(live)
    for tag in live:
        assert live[tag][:STEPS] == saved[tag][:STEPS], tag


def test_live_callback_follows_optimizer_steps_by_itself(tmp_path):
    require("tensorboard")
    from torchmem.integrations.tensorboard import TorchmemCallback

    prof = torchmem.MemoryProfiler(auto_snapshot=False)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    stepper = register_optimizer_step_post_hook(lambda *_: prof.step())  # as enable() does
    try:
        with TorchmemCallback(tmp_path / "auto", profiler=prof) as tb, HostTracker(prof):
            model = torch.nn.Linear(4, 2)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            for _ in range(3):
                model(torch.randn(2, 4)).sum().backward()
                opt.step()
            assert tb.steps_written == 3
    finally:
        stepper.remove()
    # Nothing was allocated after the last step: no fourth point.
    assert [s for s, _ in _scalars(tmp_path / "auto")["torchmem/peak_bytes"]] == [0, 1, 2]
    prof.close()
