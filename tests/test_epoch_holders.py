"""The epoch check names who holds a leak: six classic training-loop leaks, each caught with
the line that allocated and a holder path that names the variable, attribute or key.
(The clean 20-epoch run, which must report and search nothing, is in test_epoch.py.)"""

from __future__ import annotations

import gc
import os
import re

import torch
import torch.nn.functional as F

from torchmem.analysis.sites import user_frame
from torchmem.epoch import epoch

# The default 2 s holder budget can run out on a loaded CI machine once the
# suite has filled the heap; these tests check what the search finds.
WALK_BUDGET_S = 120.0

HERE = os.path.abspath(__file__)


def line_of(marker: str) -> int:
    """The line of this file that ends with ``# marker``."""
    with open(HERE) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith("# " + marker))


def site_line(growth) -> tuple[str, int]:
    filename, line, _fn = user_frame(growth.site.stack)
    return os.path.abspath(filename), line


def growth_at(result, marker: str):
    """The growing site allocated at the line marked ``marker``."""
    want = (HERE, line_of(marker))
    found = [g for g in result.leaks if site_line(g) == want]
    assert found, (want, [site_line(g) for g in result.leaks])
    return found[0]


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))


def test_1_losses_kept_with_their_graph(tracked):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    y = torch.randn(8, 4)
    history = []
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
            for _ in range(5):
                opt.zero_grad()
                batch = torch.randn(8, 16)  # BATCH-1
                out = model(batch)  # ACT-1
                loss = F.mse_loss(out, y)  # LOSS-1
                history.append(loss)  # the leak: each loss keeps its graph
                loss.backward(retain_graph=True)
                opt.step()
    frame = "<frame test_1_losses_kept_with_their_graph()"
    # history[5:10] are this epoch's; the newest is also the local 'loss', one edge closer.
    loss_site = growth_at(e.result, "LOSS-1")
    assert loss_site.holders[0] == f"{frame} local 'history'>[8] -> Tensor"
    assert (loss_site.holders[0].allocation_count, loss_site.holders[0].root_kind) == (4, "frame")
    assert loss_site.holders[1] == f"{frame} local 'loss'> -> Tensor"
    # The batches live on only in the graphs: Linear saved each one for its weight's gradient.
    [top, _] = growth_at(e.result, "BATCH-1").holders
    assert top == (f"{frame} local 'history'>[8] -> Tensor.grad_fn -> MseLossBackward0 -> ... -> "
                   "AddmmBackward0._saved_mat1 -> saved tensor")
    assert top.allocation_count == 4
    # Linear 2's input (the ReLU's output) is saved twice over, as mat1 and as the ReLU's result.
    act = growth_at(e.result, "ACT-1").holders[0]
    assert act.startswith(f"{frame} local 'history'>[8] -> Tensor.grad_fn -> MseLossBackward0 -> ")
    assert act.endswith(" -> saved tensor")
    assert f"held by: {frame} local 'history'>[8] -> Tensor" in e.report()


class Trainer:
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.cache: dict = {}

    def step(self, step: int, x: torch.Tensor) -> torch.Tensor:
        activations = self.model(x)  # CACHE-2
        self.cache[f"step{step}"] = activations.detach()  # the leak: a cache keyed by step
        return activations.sum()


def test_2_cache_keyed_by_step_on_an_object(tracked):
    trainer = Trainer(mlp())
    x = torch.randn(8, 16)
    step = 0
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
            for _ in range(5):
                trainer.step(step, x).backward()
                step += 1
    [g] = e.leaks
    assert site_line(g) == (HERE, line_of("CACHE-2"))
    assert g.grown_bytes == 5 * 8 * 4 * 4
    [h] = g.holders
    assert h == ("<frame test_2_cache_keyed_by_step_on_an_object() local 'trainer'> -> "
                 "Trainer.cache['step9'] -> Tensor")
    assert (h.allocation_count, h.held_bytes) == (5, 640)


def make_logger(t: torch.Tensor):
    return lambda: float(t.sum())


def test_3_closure_kept_in_a_list(tracked):
    model = mlp()
    x = torch.randn(8, 16)
    callbacks = []
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
            for _ in range(4):
                with torch.no_grad():
                    scores = model(x).softmax(-1)  # CLOSURE-3
                callbacks.append(make_logger(scores))  # the leak: the closure keeps scores
    g = growth_at(e.result, "CLOSURE-3")
    h = g.holders[0]
    # callbacks[4:8] are this epoch's; the newest scores is also the local 'scores'.
    assert h == ("<frame test_3_closure_kept_in_a_list() local 'callbacks'>[6] -> "
                 "<lambda> closure 't' -> Tensor")
    assert h.allocation_count == 3


def train_step(model: torch.nn.Module, batch: torch.Tensor) -> None:
    out = model(batch)
    raise ValueError(f"loss is not finite ({out.shape})")


def test_4_exception_kept_with_its_traceback(tracked):
    model = mlp()
    errors = []
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
            for _ in range(3):
                batch = torch.randn(8, 16)  # BATCH-4
                try:
                    train_step(model, batch)
                except ValueError as err:
                    errors.append(err)  # the leak: the traceback keeps train_step's frame
    g = growth_at(e.result, "BATCH-4")
    h = g.holders[0]
    assert h == ("<frame test_4_exception_kept_with_its_traceback() local 'errors'>[4] -> "
                 "ValueError.__traceback__ -> <frame train_step() local 'batch'> -> Tensor")
    assert h.allocation_count == 2  # the third batch is also the local 'batch', one edge closer


class OutputRecorder:
    def __init__(self) -> None:
        self.outputs: list = []

    def __call__(self, module, inputs, output) -> None:
        self.outputs.append(output.detach())


def test_5_forward_hook_registered_every_step(tracked):
    model = mlp()
    x = torch.randn(8, 16)
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
            for _ in range(3):
                model.register_forward_hook(OutputRecorder())  # the leak: one more hook a step
                with torch.no_grad():
                    model(x)  # HOOK-5
    g = growth_at(e.result, "HOOK-5")
    h = g.holders[0]
    # Every hook keeps every output it saw; the first hook (its key is a global
    # handle counter) saw them all: outputs[3:6] are this epoch's.
    assert re.fullmatch(r"<frame test_5_forward_hook_registered_every_step\(\) local 'model'> -> "
                        r"Sequential\._forward_hooks\[\d+\] -> OutputRecorder\.outputs\[5\] -> "
                        r"Tensor", h), h
    assert h.allocation_count == 3


class Peer:
    def __init__(self) -> None:
        self.other = None
        self.state = None


def test_6_tensors_held_only_by_reference_cycles(tracked):
    model = mlp()
    x = torch.randn(8, 16)
    was = gc.isenabled()
    gc.disable()  # a loop that runs with the GC off: only a collection would free the cycles
    try:
        for _ in range(2):
            # collect=False: the check's own collection would free the cycles before it measured.
            with epoch(profiler=tracked, collect=False, holders_budget_s=WALK_BUDGET_S) as e:
                for _ in range(3):
                    a, b = Peer(), Peer()
                    a.other, b.other = b, a
                    with torch.no_grad():
                        a.state = model(x)  # CYCLE-6
        g = growth_at(e.result, "CYCLE-6")
        cycle = [h for h in g.holders if h.root_kind == "cycle"]
        assert cycle[0] == ("<reference cycle no root reaches: Peer.other -> Peer.other> -> "
                            "Peer.state -> Tensor")
        assert cycle[0].allocation_count == 2  # the third pair is still the locals a and b
        assert "reference cycle no root reaches" in e.report()
    finally:
        del a, b
        gc.collect()
        if was:
            gc.enable()


def test_the_default_check_says_what_its_own_collection_freed(tracked):
    was = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):
            with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S) as e:
                for _ in range(3):
                    a, b = Peer(), Peer()
                    a.other, b.other = b, a
                    a.state = torch.zeros(256)  # 1 KiB held only by the cycle
                del a, b
        assert e.leaks == [] and e.result.gc_freed_bytes == 3 * 1024
        assert ("the check's own gc.collect() freed 3.00 KiB that only reference cycles held; "
                "epoch(collect=False) counts such memory and names the cycles") in e.report()
    finally:
        gc.collect()
        if was:
            gc.enable()


def test_holders_false_skips_the_search(tracked):
    kept = []
    for _ in range(2):
        with epoch(profiler=tracked, holders=False) as e:
            kept.append(torch.zeros(256))  # OFF
    g = growth_at(e.result, "OFF")
    assert g.holders == [] and e.result.holder_search is None
    assert "held by" not in e.report()


def test_a_search_that_runs_out_of_time_says_so(tracked):
    kept = []
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=0) as e:
            kept.append(torch.zeros(256))  # BUDGET
    g = growth_at(e.result, "BUDGET")
    assert g.holders[0].root_kind == "not_found" and "budget ran out" in g.holders[0]
    assert "stopped early at its 0 s time budget" in e.report()


def test_example_leaky_history_names_history_for_every_growing_site(tracked):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(HERE), os.pardir, "examples"))
    try:
        import leaky_history
    finally:
        sys.path.pop(0)
    try:
        checks = leaky_history.main(epochs=2, profiler=tracked, holders_budget_s=WALK_BUDGET_S)
    finally:
        leaky_history.history.clear()  # the example's leak, kept in its module: not for later tests
    leaks = checks[-1].leaks
    # Three lines allocate: the batch, model(x) (both Linear layers and the ReLU), the loss.
    assert len(leaks) == 3 and checks[-1].result.total_grown_bytes == 540 * 1024
    for g in leaks:  # history[20:40] are epoch 2's
        assert g.holders[0].startswith(f"{leaky_history.__name__}.history[39] -> Tensor")
        assert g.holders[0].allocation_count == 20
    assert sum("saved tensor" in g.holders[0] for g in leaks) == 2
