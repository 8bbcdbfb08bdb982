"""torchmem.integrations.lightning.TorchmemCallback on real Lightning training runs (CPU)."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import torchmem
from torchmem import _session

from _integration_helpers import close_session, session, sql_step_peaks  # noqa: F401
from _optional import require

STEPS_PER_EPOCH = 10
LEAK_LINE = "self.kept.append(torch.ones(64, 8))  # the leak"


@functools.lru_cache(maxsize=None)
def _lightning() -> types.SimpleNamespace:
    """Lightning, imported when a test runs, not when pytest collects this file: importing
    it makes tensors that the first CPU allocator hook of the process would adopt."""
    pl = require("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from torchmem.integrations.lightning import TorchmemCallback

    class Net(pl.LightningModule):
        def __init__(self, leak: bool = False) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(32, 8)
            self.leak = leak
            self.kept: list[torch.Tensor] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = torch.nn.functional.mse_loss(self.layer(x), y)
            if self.leak:
                self.kept.append(torch.ones(64, 8))  # the leak
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    return types.SimpleNamespace(pl=pl, CSVLogger=CSVLogger, Callback=TorchmemCallback, Net=Net)


def TorchmemCallback(*args, **kwargs):
    return _lightning().Callback(*args, **kwargs)


def Net(leak: bool = False):
    return _lightning().Net(leak)


def _loader():
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(80, 32, generator=g),
                                        torch.randn(80, 8, generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=8)


def _fit(tmp_path, callback, model, epochs=3):
    lit = _lightning()
    trainer = lit.pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1,
                             logger=lit.CSVLogger(tmp_path / "logs", name="run"),
                             log_every_n_steps=1, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[callback])
    trainer.fit(model, _loader())
    return trainer


def _metrics_rows(trainer):
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def _column(rows, name):
    return [(int(r["step"]), float(r[name])) for r in rows if r.get(name)]


def test_three_epochs_clean_model(session, capsys):
    cb = TorchmemCallback(trace_dir=str(session), summary=False, auto_snapshot=False)
    assert _session.is_enabled() and cb.profiler is _session.get_profiler()
    trainer = _fit(session, cb, Net())
    # The leak check: a baseline, then no site grew (Lightning's own metric
    # state, made after the first epoch's end, is not counted).
    assert [(r.index, r.baseline, r.total_grown_bytes, r.leaks) for r in cb.epoch_results] == \
        [(1, True, 0, []), (2, False, 0, []), (3, False, 0, [])]
    assert len({r.live_bytes for r in cb.epoch_results}) == 1
    rows = _metrics_rows(trainer)
    peaks = _column(rows, "torchmem/peak_bytes")
    steps = 3 * STEPS_PER_EPOCH
    # One point per optimizer step, at Lightning's step; torchmem's step k is
    # the k-th optimizer step (Lightning's global step k + 1 after it).
    assert [s for s, _ in peaks] == list(range(steps))
    assert [(s, v) for s, v in peaks] == [(s, m["torchmem/peak_bytes"]) for s, m in cb.logged]
    assert [s for s, _ in _column(rows, "torchmem/epoch_grown_bytes")] == \
        [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH, 3 * STEPS_PER_EPOCH]
    assert [v for _, v in _column(rows, "torchmem/epoch_live_bytes")] == \
        [float(r.live_bytes) for r in cb.epoch_results]
    (summary,) = cb.summaries  # one process: its own summary
    prof = cb.profiler
    assert summary.peak_bytes == prof.get_statistics().peak_usage_bytes
    assert "torchmem epoch" not in capsys.readouterr().err  # nothing grew: nothing printed
    if hasattr(prof, "breakdown"):  # attribution (issue 18): the parameters, exactly,
        params = float(sum(p.numel() * p.element_size() for p in trainer.model.parameters()))
        assert {v for _, v in _column(rows, "torchmem/category_bytes/parameter")} == {params}
        cats = [k for k in rows[0] if k.startswith("torchmem/category_bytes/")]
        for r in rows:  # and the categories add up to the step's peak
            if r.get("torchmem/peak_bytes"):
                assert sum(float(r[k] or 0) for k in cats) == float(r["torchmem/peak_bytes"])
    else:
        assert not [k for k in rows[0] if k.startswith("torchmem/category_bytes")]
    path = close_session()
    truth = sql_step_peaks(path)
    assert [(s, v) for s, v in peaks] == [(s, float(truth[s])) for s in range(steps)]


def test_a_leak_is_named_and_raises_at_the_second_epoch_end(session, capsys):
    cb = TorchmemCallback(raise_on_leak=True, trace_dir=str(session), summary=False)
    with pytest.raises(torchmem.LeakError) as info:
        _fit(session, cb, Net(leak=True))
    result = info.value.result
    assert (result.index, result.total_grown_bytes) == (2, STEPS_PER_EPOCH * 64 * 8 * 4)
    (growth,) = result.leaks
    line = next(i for i, text in enumerate(open(__file__), 1) if text.strip() == LEAK_LINE)
    assert growth.site.label.startswith(f"{__file__}:{line} in ")
    assert growth.site.label.endswith("Net.training_step [CPU, host]")
    assert (growth.count_before, growth.count_after) == (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)
    assert f"{__file__}:{line}" in capsys.readouterr().err  # the report, on rank 0


def test_category_breakdown_is_logged_when_the_profiler_has_one(session, monkeypatch):
    cb = TorchmemCallback(trace_dir=str(session), summary=False)
    asked = []

    def categories(steps):  # StepCategoryTracker's: breakdown(by="category", at=step)
        asked.extend(steps)
        return {s: {"parameter": 1056, "gradient": 1056, "activation": s} for s in steps}

    monkeypatch.setattr(cb.core._categories, "categories", categories)
    trainer = _fit(session, cb, Net(), epochs=1)
    rows = _metrics_rows(trainer)
    assert asked == list(range(STEPS_PER_EPOCH))
    assert _column(rows, "torchmem/category_bytes/parameter") == \
        [(s, 1056.0) for s in range(STEPS_PER_EPOCH)]
    assert _column(rows, "torchmem/category_bytes/activation") == \
        [(s, float(s)) for s in range(STEPS_PER_EPOCH)]


def test_callback_waits_for_lightning_after_a_disable(session):
    cb = TorchmemCallback(trace_dir=str(session), summary=False)
    _session.disable()
    _fit(session, cb, Net(), epochs=1)  # setup() resumed recording
    assert _session.is_enabled() and len(cb.logged) == STEPS_PER_EPOCH


def test_a_pickled_callback_records_in_its_new_process(session):
    """What ddp_spawn does with callbacks: each worker enables torchmem again."""
    import pickle

    cb = TorchmemCallback(trace_dir=str(session), summary=False)
    cb.core.epoch_end()  # some state to carry over
    copy = pickle.loads(pickle.dumps(cb))  # as the Trainer does before it spawns
    assert copy.profiler is _session.get_profiler()  # this process's, enabled again
    assert [r.index for r in copy.epoch_results] == [1]
    _fit(session, copy, Net(), epochs=1)
    assert len(copy.logged) == STEPS_PER_EPOCH
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(TorchmemCallback(profiler=torchmem.MemoryProfiler(auto_snapshot=False)))


SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import pytorch_lightning as pl
    from torchmem.integrations.lightning import TorchmemCallback

    class Net(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)
        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = TorchmemCallback(trace_dir=sys.argv[1], summary=False)
    ds = torch.utils.data.TensorDataset(torch.randn(16, 4))
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", devices=int(sys.argv[2]),
                         strategy=sys.argv[3], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[cb])
    trainer.fit(Net(), torch.utils.data.DataLoader(ds, batch_size=4))
    with open(f"out-rank{trainer.global_rank}.json", "w") as f:  # ranks share stdout
        json.dump({
            "rank": trainer.global_rank, "is_pl": isinstance(cb, pl.Callback),
            "lightning_imported": "lightning.pytorch" in sys.modules, "steps": len(cb.logged),
            "epochs": [r.index for r in cb.epoch_results],
            "summaries": None if cb.summaries is None else [s.rank for s in cb.summaries]}, f)
""")


def _run_script(tmp_path, devices, strategy):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "traces"), str(devices),
                           strategy], capture_output=True, text=True, timeout=300, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, [json.loads(p.read_text()) for p in sorted(tmp_path.glob("out-rank*.json"))]


def test_pytorch_lightning_under_ddp_gathers_the_summary_on_rank_0(tmp_path):
    """The other importable name, in a 2-rank DDP run (gloo, CPU) in one go."""
    require("pytorch_lightning")
    proc, outs = _run_script(tmp_path, 2, "ddp")
    by_rank = {o["rank"]: o for o in outs}
    assert sorted(by_rank) == [0, 1]
    # A pytorch_lightning Callback, without importing lightning.pytorch as well.
    assert all(o["is_pl"] and not o["lightning_imported"] for o in outs)
    # Every rank took part in the collective; rank 0 has both summaries and
    # printed them, the others get None.
    assert by_rank[0]["summaries"] == [0, 1] and by_rank[1]["summaries"] is None
    assert all(o["epochs"] == [1, 2] and o["steps"] == 4 for o in outs)  # 2 batches of 4 per rank
    assert "torchmem: 2 rank(s)" in proc.stderr
    assert "rank 0 (" in proc.stderr and "rank 1 (" in proc.stderr

