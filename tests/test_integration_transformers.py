"""torchmem.integrations.transformers.TorchmemCallback on real Hugging Face Trainer runs (CPU).

The model is built from a config: no weights, no hub (HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import functools
import os
import types

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers reads it: nothing is downloaded
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

import torchmem  # noqa: E402
from torchmem import _session  # noqa: E402

from _integration_helpers import close_session, session, sql_step_peaks  # noqa: E402,F401
from _optional import require  # noqa: E402



@functools.lru_cache(maxsize=None)
def _hf() -> types.SimpleNamespace:
    """transformers, imported when a test runs, not when pytest collects this file (its
    import makes tensors that the first CPU allocator hook of the process would adopt)."""
    transformers = require("transformers")
    require("accelerate")
    from torchmem.integrations.transformers import TorchmemCallback

    return types.SimpleNamespace(hf=transformers, Callback=TorchmemCallback)


def TorchmemCallback(*args, **kwargs):
    return _hf().Callback(*args, **kwargs)

SAMPLES, BATCH = 32, 4
STEPS_PER_EPOCH = SAMPLES // BATCH
LEAK_LINE = "self.kept.append(torch.ones(32, 16))  # the leak"


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 64, (SAMPLES, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _gpt2():
    cfg = _hf().hf.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return _hf().hf.GPT2LMHeadModel(cfg)


class LeakyRegressor(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(16, 1)
        self.kept: list[torch.Tensor] = []

    def forward(self, input_ids, labels):
        self.kept.append(torch.ones(32, 16))  # the leak
        loss = torch.nn.functional.mse_loss(self.layer(input_ids.float()).squeeze(-1),
                                            labels.float().mean(-1))
        return {"loss": loss}


def _train(tmp_path, callback, model, epochs=2):
    args = _hf().hf.TrainingArguments(
        output_dir=str(tmp_path / "out"), num_train_epochs=epochs,
        per_device_train_batch_size=BATCH, logging_steps=1, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = _hf().hf.Trainer(model=model, args=args, train_dataset=Tokens(),
                                   callbacks=[callback])
    trainer.train()
    return trainer


def _history(trainer, key):
    return [(h["step"], h[key]) for h in trainer.state.log_history if key in h]


def test_two_epochs_tiny_gpt2(session, capsys):
    cb = TorchmemCallback(trace_dir=str(session), summary=False, auto_snapshot=False)
    assert _session.is_enabled()
    trainer = _train(session, cb, _gpt2())
    assert cb.trainer is trainer  # found without being told
    assert [(r.index, r.baseline, r.total_grown_bytes) for r in cb.epoch_results] == \
        [(1, True, 0), (2, False, 0)]
    steps = 2 * STEPS_PER_EPOCH
    peaks = _history(trainer, "torchmem/peak_bytes")
    # Through Trainer.log, at every logging step (logging_steps=1): the
    # Trainer's global step k is the end of torchmem's step k - 1.
    assert [s for s, _ in peaks] == list(range(1, steps + 1))
    assert peaks == [(s + 1, m["torchmem/peak_bytes"]) for s, m in cb.logged]
    # The Trainer's own logs are all still there.
    assert [s for s, _ in _history(trainer, "loss")] == list(range(1, steps + 1))
    assert _history(trainer, "torchmem/epoch_grown_bytes") == \
        [(STEPS_PER_EPOCH, 0.0), (steps, 0.0)]
    assert [v for _, v in _history(trainer, "torchmem/epoch_live_bytes")] == \
        [float(r.live_bytes) for r in cb.epoch_results]
    (summary,) = cb.summaries
    prof = cb.profiler
    assert summary.peak_bytes == prof.get_statistics().peak_usage_bytes
    if hasattr(prof, "breakdown"):  # attribution (issue 18): the parameters, exactly
        params = float(sum(p.untyped_storage().nbytes() for p in
                           {p.untyped_storage().data_ptr(): p for p in
                            trainer.model.parameters()}.values()))
        assert {v for _, v in _history(trainer, "torchmem/category_bytes/parameter")} == {params}
        for h in trainer.state.log_history:  # the categories add up to the step's peak
            if "torchmem/peak_bytes" in h:
                assert sum(v for k, v in h.items() if k.startswith("torchmem/category_bytes/")) \
                    == h["torchmem/peak_bytes"]
    else:
        assert not [k for h in trainer.state.log_history for k in h
                    if k.startswith("torchmem/category_bytes")]
    path = close_session()
    truth = sql_step_peaks(path)
    assert peaks == [(s + 1, float(truth[s])) for s in range(steps)]


def test_a_leak_is_named_and_raises_at_the_second_epoch_end(session, capsys):
    cb = TorchmemCallback(raise_on_leak=True, trace_dir=str(session), summary=False)
    with pytest.raises(torchmem.LeakError) as info:
        _train(session, cb, LeakyRegressor(), epochs=3)
    result = info.value.result
    assert (result.index, result.total_grown_bytes) == (2, STEPS_PER_EPOCH * 32 * 16 * 4)
    (growth,) = result.leaks
    line = next(i for i, text in enumerate(open(__file__), 1) if text.strip() == LEAK_LINE)
    assert growth.site.label.startswith(f"{__file__}:{line} in LeakyRegressor.forward")
    assert f"{__file__}:{line}" in capsys.readouterr().err


def test_category_breakdown_goes_into_the_trainer_log(session, monkeypatch):
    cb = TorchmemCallback(trace_dir=str(session), summary=False)
    # StepCategoryTracker's answer (breakdown(by="category", at=step) at each step).
    monkeypatch.setattr(cb.core._categories, "categories",
                        lambda steps: {s: {"parameter": 4096, "input": s} for s in steps})
    trainer = _train(session, cb, _gpt2(), epochs=1)
    assert _history(trainer, "torchmem/category_bytes/parameter") == \
        [(s, 4096.0) for s in range(1, STEPS_PER_EPOCH + 1)]
    assert _history(trainer, "torchmem/category_bytes/input") == \
        [(s + 1, float(s)) for s in range(STEPS_PER_EPOCH)]


def test_without_a_trainer_the_metrics_stay_in_the_callback(session):
    cb = TorchmemCallback(trace_dir=str(session), summary=False)
    state = _hf().hf.TrainerState()
    control = _hf().hf.TrainerControl()
    cb.on_train_begin(None, state, control)  # not called by a Trainer: none is found
    assert cb.trainer is None
    x = torch.ones(256)
    cb.profiler.step()
    control.should_log = True
    with pytest.warns(RuntimeWarning, match="callback.logged only"):
        cb.on_step_end(None, state, control)
    assert control.should_log  # the Trainer's own log of the step is not cancelled
    assert cb.logged[0][1]["torchmem/current_bytes"] >= x.nbytes
