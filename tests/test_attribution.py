"""Attribution: the category, module and phase of every byte, exact against torch's objects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchmem
from torchmem.analysis.categories import CATEGORIES
from torchmem.analysis.steps import step_memory
from torchmem.units import format_bytes

from _attribution_helpers import (CNN, MLP, Block, attributed, batches, exact_state, same_run,
                                  storage_bytes, train)

ROLES = ("parameter", "buffer", "gradient", "optimizer_state")


def _check_step_ends(prof, make_model, make_opt, shape, classes, loss_fn=None):
    seen = []
    data = batches(shape, classes)

    def check(model, opt, step):
        now = prof.breakdown("category", at="now")
        want = exact_state(model, opt)
        # The batches passed into the model so far (the labels are not: they are "other").
        want["input"] = storage_bytes(x for x, _ in data[:step + 1])
        assert {k: now.get(k, 0) for k in (*ROLES, "input")} == want, f"step {step}"
        assert sum(now.values()) == prof.get_statistics().current_usage_bytes
        seen.append(step)

    train(make_model, make_opt, data, prof, check, loss_fn=loss_fn)
    assert seen == [0, 1, 2]
    peak = prof.breakdown("category", at="peak")
    assert sum(peak.values()) == prof.get_statistics().peak_usage_bytes
    assert set(peak) <= set(CATEGORIES)
    for by in ("module", "phase", "site", "type", "device"):
        assert sum(prof.breakdown(by, at="peak").values()) == prof.get_statistics().peak_usage_bytes
    for step in range(3):
        at_step = prof.breakdown("category", at=step)
        assert sum(at_step.values()) == max(s.peak_bytes for s in prof.step_peaks()
                                            if s.step == step)


def test_mlp_adam_exact_at_each_step_end():
    with attributed(capture_stack_traces=True) as prof:
        _check_step_ends(prof, MLP, torch.optim.Adam, (8, 16), 4)


def test_cnn_batchnorm_sgd_momentum_exact_at_each_step_end():
    with attributed() as prof:
        _check_step_ends(prof, CNN, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
                         (4, 3, 8, 8), 10)


def test_transformer_block_adamw_exact_at_each_step_end():
    def loss_fn(out, y):
        return out.square().mean()

    with attributed() as prof:
        _check_step_ends(prof, Block, torch.optim.AdamW, (2, 5, 32), 1, loss_fn=loss_fn)


def test_module_totals_of_a_hand_built_model():
    with attributed() as prof:
        torch.manual_seed(0)
        net = MLP(16, 32, 4)
        x = torch.randn(8, 16)
        seen = {}
        out = net(x)
        out.grad_fn.register_prehook(lambda g: seen.update(
            module=prof.breakdown("module", "now"), category=prof.breakdown("category", "now")))
        out.sum().backward()
        f = 4  # float32
        params = {"MLP.fc1": (16 * 32 + 32) * f, "MLP.fc2": (32 * 4 + 4) * f}
        # At the start of backward: each layer's parameters and its forward's
        # outputs that autograd keeps (fc1's output is saved by nobody: ReLU
        # saves its own result, which fc2 saves as its input).
        assert seen["module"]["MLP.fc1"] == params["MLP.fc1"]
        assert seen["module"]["MLP.relu"] == 8 * 32 * f
        assert seen["module"]["MLP.fc2"] == params["MLP.fc2"] + 8 * 4 * f  # + its output
        # After backward: parameters and gradients by owner.
        end = prof.breakdown("module", "now")
        assert end["MLP.fc1"] == 2 * params["MLP.fc1"]
        assert end["MLP.fc2"] == 2 * params["MLP.fc2"] + 8 * 4 * f  # + out, still held
        assert seen["category"]["activation"] == 8 * 32 * f + 8 * 4 * f


def test_activation_at_backward_start_is_what_autograd_saved():
    from torch.autograd.graph import saved_tensors_hooks

    with attributed() as prof:
        torch.manual_seed(0)
        for make, shape in ((MLP, (8, 16)), (CNN, (4, 3, 8, 8)), (Block, (2, 5, 32))):
            model = make()
            x = torch.randn(*shape)
            saved: list[torch.Tensor] = []

            def pack(t):
                saved.append(t)
                return t

            with saved_tensors_hooks(pack, lambda t: t):
                out = model(x)
                loss = out.square().sum()  # saves `out`
            seen = {}
            out.grad_fn.register_prehook(lambda g: seen.update(prof.breakdown("category", "now")))
            own = {t.untyped_storage().data_ptr() for t in [*model.parameters(),
                                                             *model.buffers(), x]}
            activations = storage_bytes(t for t in saved if t.untyped_storage().data_ptr()
                                        not in own)
            loss.backward()
            assert seen["activation"] == activations, make.__name__
            del model, out, loss, saved


def test_a_loaded_trace_gives_the_same_breakdowns(tmp_path):
    from torchmem.storage import SQLiteStorage

    path = tmp_path / "t.db"
    with attributed(storage=SQLiteStorage(path), capture_stack_traces=True) as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4), prof)
        live = {(by, at): prof.breakdown(by, at) for by in ("category", "module", "phase", "site")
                for at in ("peak", "now", 0, 2)}
        report = prof.peak_report().format()
    prof.storage.wait()
    back = torchmem.load(path)
    for (by, at), want in live.items():
        assert back.breakdown(by, at) == want, (by, at)
    assert back.peak_report().format() == report


def test_peak_report_and_step_peaks():
    with attributed() as prof:
        train(MLP, torch.optim.Adam, batches((8, 16), 4), prof)
        report = prof.peak_report(top=2)
        stats = prof.get_statistics()
        assert report.overall.bytes == stats.peak_usage_bytes
        assert sum(report.overall.by_category.values()) == stats.peak_usage_bytes
        assert len(report.overall.by_module) <= 2 and len(report.overall.by_site) <= 2
        assert [p.step for p in report.steps] == [0, 1, 2, 3]
        peaks = prof.step_peaks()
        for p in peaks[:3]:
            assert set(p.peak_by_phase) == {"forward", "backward", "optimizer", "other"}
            assert p.peak_bytes == max(p.peak_by_phase.values())
        # One per-step computation (analysis.steps): the records the TensorBoard
        # export and the callbacks use, and the moments breakdown(at=step) shows.
        assert peaks == list(step_memory(prof))
        assert [s.seq for s in report.steps] == [p.peak_seq for p in peaks]
        for p in peaks:
            assert sum(prof.breakdown("category", p.step).values()) == p.peak_bytes, p.step
        # Adam's state appears in the first step: its optimizer peak is the highest.
        assert report.overall.step == 0 and report.overall.phase == "optimizer"
        text = report.format()
        assert text.startswith(f"peak {format_bytes(stats.peak_usage_bytes)} "
                               "at step 0, optimizer")


def test_bad_queries_are_clear_errors():
    with attributed() as prof:
        with pytest.raises(ValueError, match="by must be one of"):
            prof.breakdown("colour")
        with pytest.raises(ValueError, match="at must be"):
            prof.breakdown("category", at="yesterday")
        assert prof.breakdown("category", at="peak") == {}
        x = torch.zeros(10)
        with pytest.raises(ValueError, match="no events of step 5"):
            prof.breakdown("category", at=5)
        with pytest.raises(ValueError, match="top must be"):
            prof.peak_report(top=0)
        del x


def test_possible_leaks_leave_out_what_is_alive_by_design():
    with attributed() as prof:
        losses = []
        torch.manual_seed(0)
        model = MLP()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for x, y in batches((8, 16), 4):
            opt.zero_grad(set_to_none=False)  # .grad kept from step to step
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)  # the leak: every loss keeps its graph's tensors
        state = {t.untyped_storage().data_ptr() for t in [
            *model.parameters(), *(p.grad for p in model.parameters()),
            *(v for s in opt.state.values() for v in s.values())]}
        leaks = prof.detect_potential_leaks()
        assert leaks and not {leak.address for leak in leaks} & state
        everything = prof.detect_potential_leaks(include_model_state=True)
        assert state <= {leak.address for leak in everything}
        assert len(everything) == len(leaks) + len(state)


def test_breakdown_of_one_device():
    prof = torchmem.MemoryProfiler(auto_snapshot=False)
    prof.track_allocation(0x1000, 100, "GPU", device=0)
    prof.track_allocation(0x2000, 1000, "CPU")            # the overall peak: 1100 + 50
    prof.track_allocation(0x3000, 50, "GPU", device=1)
    prof.track_deallocation(0x2000)
    prof.track_allocation(0x4000, 300, "GPU", device=0)   # device 0's peak: 400
    prof.track_deallocation(0x4000)
    assert prof.breakdown("device", "peak") == {"host": 1000, "cuda:0": 100, "cuda:1": 50}
    assert prof.breakdown("device", "peak", device=0) == {"cuda:0": 400}
    assert prof.breakdown("type", "peak", device=-1) == {"CPU": 1000}
    assert prof.breakdown("device", "now", device=0) == {"cuda:0": 100}
    assert prof.breakdown("device", 0, device=1) == {"cuda:1": 50}
    assert sum(prof.breakdown("category", "peak", device=0).values()) == \
        prof.get_statistics_for_device(0).peak_usage_bytes
    with pytest.raises(ValueError, match="device must be"):
        prof.breakdown("device", "peak", device=-2)
