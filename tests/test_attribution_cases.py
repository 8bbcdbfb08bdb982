"""Attribution in the cases training code meets: each run gives bit-identical losses and
gradients with and without torchmem, and the categories stay exact."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchmem
from torchmem import _native, _session

from _attribution_helpers import (CNN, MLP, Block, attributed, batches, exact_state, same_run,
                                  storage_bytes, train)

ROLES = ("parameter", "buffer", "gradient", "optimizer_state")


def _exact(prof):
    def check(model, opt, step):
        now = prof.breakdown("category", at="now")
        assert {k: now.get(k, 0) for k in ROLES} == exact_state(model, opt), f"step {step}"
    return check


def _modules_of(prof, rows):
    return {prof.resolve_context(c)[0] for c in np.unique(rows["context_id"]).tolist()}


def _both(make_model, make_opt, shape, classes, n=3, check=None, **kw):
    """The same training without and with torchmem; asserts they are bit-identical and
    returns the (closed, still readable) profiler."""
    plain = train(make_model, make_opt, batches(shape, classes, n), **kw)
    with attributed() as prof:
        data = batches(shape, classes, n)
        run = train(make_model, make_opt, data, prof, check=check and check(prof), **kw)
    assert same_run(plain, run)
    return prof


def test_gradient_accumulation():
    prof = _both(MLP, torch.optim.Adam, (8, 16), 4, n=6, accumulate=3, check=_exact)
    assert [p.step for p in prof.step_peaks()][:2] == [0, 1]


def test_no_grad_evaluation_has_no_activations():
    with attributed() as prof:
        train(MLP, lambda p: torch.optim.SGD(p, lr=0.1), batches((8, 16), 4, 1), prof)
        torch.manual_seed(0)
        model = MLP()
        x = torch.randn(64, 16)
        with torch.no_grad():
            y = model(x)
        eval_step = prof.current_step
        at = prof.breakdown("category", at=eval_step)
        assert "activation" not in at
        assert at["temporary"] + at.get("other", 0) > 0  # the forward's outputs
        # Until the step ends its output counts as an activation; after, not.
        assert prof.breakdown("category", "now").get("activation", 0) == y.untyped_storage().nbytes()
        prof.step()
        prof.track_allocation(0x10, 1)  # an event of the next step
        assert "activation" not in prof.breakdown("category", "now")


def test_two_models_in_one_process():
    class Generator(MLP):
        pass

    class Discriminator(MLP):
        def __init__(self):
            super().__init__(4, 8, 1)

    with attributed() as prof:
        torch.manual_seed(0)
        g, d = Generator(), Discriminator()
        opt_g, opt_d = torch.optim.Adam(g.parameters()), torch.optim.Adam(d.parameters())
        for _ in range(2):
            z = torch.randn(8, 16)
            fake = g(z)
            loss_d = d(fake.detach()).mean()
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
            loss_g = -d(fake).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
        now = prof.breakdown("category", "now")
        for k in ROLES:
            want = exact_state(g, opt_g)[k] + exact_state(d, opt_d)[k]
            assert now.get(k, 0) == want, k
        modules = prof.breakdown("module", "now")
        assert modules["Generator.fc1"] >= storage_bytes(g.fc1.parameters())
        assert modules["Discriminator.fc1"] >= storage_bytes(d.fc1.parameters())
        # The generator's output fed to the discriminator is its activation, not an input.
        assert now.get("input", 0) == storage_bytes([z])


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x):
        return self.out(self.fc(torch.relu(self.fc(x))))


def test_a_module_called_twice_in_one_forward():
    prof = _both(Twice, torch.optim.Adam, (8, 16), 4, check=_exact)
    rows = prof.event_rows_from(0)
    assert {"Twice.fc", "Twice.out"} <= _modules_of(prof, rows)
    phases = {prof.resolve_context(c) for c in np.unique(rows["context_id"]).tolist()}
    assert ("Twice.fc", "backward") in phases and ("Twice.fc", "forward") in phases


class Checkpointed(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.block = nn.Sequential(nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 32))
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=False)
        return self.head(h)


def test_activation_checkpointing():
    prof = _both(Checkpointed, torch.optim.Adam, (8, 16), 4, check=_exact)
    rows = prof.event_rows_from(0)
    contexts = {prof.resolve_context(c) for c in np.unique(rows["context_id"]).tolist()}
    # The block's forward runs again inside backward: recomputed under backward.
    assert ("Checkpointed.block.0", "backward") in contexts


def test_in_place_relu_after_batchnorm():
    # torch's global full backward hooks make this raise "Output 0 of
    # BackwardHookFunction is a view and is being modified inplace".
    prof = _both(CNN, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), (4, 3, 8, 8), 10,
                      check=_exact)
    contexts = {prof.resolve_context(c) for c in np.unique(prof.event_rows_from(0)["context_id"])}
    assert ("CNN.bn", "backward") in contexts and ("CNN.block.1", "backward") in contexts


_COMPILED = """
import sys
sys.path.insert(0, sys.argv[1])
import numpy as np
import torch
import test_attribution_cases as t
from _attribution_helpers import MLP, storage_bytes

def make():
    return torch.compile(MLP(), backend="aot_eager")

def check(prof):
    exact = t._exact(prof)

    def both(model, opt, step):
        exact(model, opt, step)
        # Parameters are named through the compiled wrapper.
        modules = prof.breakdown("module", "now")
        assert modules["MLP.fc1"] >= 2 * storage_bytes(model._orig_mod.fc1.parameters())
    return both

import warnings
with warnings.catch_warnings(record=True) as seen:
    warnings.simplefilter("always")
    prof = t._both(make, torch.optim.Adam, (8, 16), 4, check=check)
# torch warns on compile when global module hooks are installed; attribution
# wraps nn.Module.__call__ instead (sources/_module_call.py).
assert not [w for w in seen if "global hooks" in str(w.message)], [str(w.message) for w in seen]
import torchmem
from torchmem.sources import _module_call
from torchmem.sources.context import ContextSource
p2 = torchmem.MemoryProfiler(auto_snapshot=False)
with ContextSource(p2):
    assert _module_call.installed()
    torch._dynamo.reset()
    explained = torch._dynamo.explain(MLP())(torch.randn(8, 16))
    # The wrapper's compile check adds no guard that fails outside the
    # compile: three calls, one frame compiled.
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    compiled, x = torch.compile(MLP(), backend="eager"), torch.randn(8, 16)
    for _ in range(3):
        compiled(x)
    frames = dict(counters["frames"])
p2.close()
assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
assert (frames.get("total"), frames.get("ok")) == (1, 1), frames
contexts = {prof.resolve_context(c) for c in np.unique(prof.event_rows_from(0)["context_id"])}
# Inside the compiled region no hook runs: the outermost module holds it all.
assert ("MLP", "forward") in contexts and ("MLP", "backward") in contexts, contexts
print("compiled ok")
"""


def test_torch_compiled_module():
    # In a child process: dynamo keeps fake tensors of the compiled model
    # reachable for good, and other tests count every reachable tensor.
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _COMPILED, str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "compiled ok" in done.stdout


def test_threads_keep_their_own_context():
    class A(MLP):
        pass

    class B(MLP):
        pass

    results = {}
    plain = {name: train(cls, torch.optim.Adam, batches((8, 16), 4)) for name, cls in
             (("A", A), ("B", B))}
    with attributed() as prof:
        # train() seeds torch's one global generator, which two threads would
        # share: each builds its model from a copy made here, as seed 0 gives it.
        built = {}
        for name, cls in (("A", A), ("B", B)):
            torch.manual_seed(0)
            built[name] = cls()

        def work(name, cls):
            results[name] = (train(lambda: copy.deepcopy(built[name]), torch.optim.Adam,
                                   batches((8, 16), 4)),
                             threading.get_native_id())

        threads = [threading.Thread(target=work, args=(n, c)) for n, c in (("A", A), ("B", B))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = prof.event_rows_from(0)
        for name in ("A", "B"):
            run, tid = results[name]
            assert same_run(plain[name], run)
            mine = _modules_of(prof, rows[rows["thread_id"] == tid]) - {""}
            assert mine and all(m.split(".")[0] == name for m in mine), mine
        assert _native.get_context() == 0


def test_nothing_is_kept_alive():
    import gc
    import weakref

    with attributed() as prof:
        torch.manual_seed(0)
        model = CNN()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        x = torch.randn(4, 3, 8, 8)
        nn.functional.cross_entropy(model(x), torch.zeros(4, dtype=torch.long)).backward()
        opt.step()
        refs = [weakref.ref(o) for o in (model, opt, x, model.conv.weight)]
        del model, opt, x
        gc.collect()
        assert [r() for r in refs] == [None] * 4
        assert prof.get_statistics().current_usage_bytes == 0


def test_enable_attributes_by_default_and_attribution_false_turns_it_off(tmp_path):
    _session._reset_for_tests()
    try:
        p = torchmem.enable(trace=False, summary=False, auto_snapshot=False, gc=False,
                            gpu_source="none")
        train(MLP, torch.optim.Adam, batches((8, 16), 4, 1))
        assert any(m for m, _ in p.context_table())
        assert p.breakdown("category", "now").get("parameter", 0) == 0  # the model is gone
        assert len(p.attribution_marks())
    finally:
        _session._reset_for_tests()
    try:
        p = torchmem.enable(trace=False, summary=False, auto_snapshot=False, gc=False,
                            gpu_source="none", attribution=False)
        n = len(p.context_table())
        before = p.next_seq
        train(MLP, torch.optim.Adam, batches((8, 16), 4, 1))
        rows = p.event_rows_from(before)
        assert len(rows) and not rows["context_id"].any()
        assert len(p.attribution_marks()) == 0 and len(p.context_table()) == n
    finally:
        _session._reset_for_tests()
