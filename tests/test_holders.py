"""The holder search on its own: given storage addresses, the reference paths from a root
to the tensors that own them, for each kind of root and edge, and what it must not do
(run user code, keep references, leave the GC off)."""

from __future__ import annotations

import gc
import pickle
import sys
import weakref

import pytest
import torch

from torchmem.analysis.holders import Holder, find_holders, holders_by_group

# The default 2 s budget can run out on a loaded CI machine once the suite has
# filled the heap; these tests check what the search finds, not how fast.
WALK_BUDGET_S = 120.0

KEPT: list = []  # a module global the tests fill and empty


def ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def one(address: int, size: int = 1) -> Holder:
    """The one holder of ``address`` (callers pass no tensor: this frame would hold it)."""
    [h] = find_holders({address: size}, budget_s=WALK_BUDGET_S).holders()
    return h


@pytest.fixture(autouse=True)
def _empty_kept():
    KEPT.clear()
    yield
    KEPT.clear()


def test_module_global_list():
    KEPT.extend(torch.randn(4) for _ in range(3))
    h = one(ptr(KEPT[1]), 16)
    assert h == f"{__name__}.KEPT[1] -> Tensor"
    assert (h.root_kind, h.allocation_count, h.held_bytes) == ("module", 1, 16)


def test_paths_of_one_shape_are_one_holder_with_their_bytes_added():
    KEPT.extend(torch.randn(n) for n in (1, 2, 3, 4))
    search = find_holders({ptr(t): t.nbytes for t in KEPT}, budget_s=WALK_BUDGET_S)
    [h] = search.holders()
    assert h == f"{__name__}.KEPT[3] -> Tensor"  # the largest stands for the group
    assert (h.allocation_count, h.held_bytes) == (4, 40)
    assert not search.stopped_early and search.error is None
    [h] = find_holders({ptr(t): 4 for t in KEPT[::-1]}, budget_s=WALK_BUDGET_S).holders()
    assert h == f"{__name__}.KEPT[0] -> Tensor"  # of equals, the last given


def _frame_holder() -> Holder:
    losses = [torch.randn(2), torch.randn(3)]
    return one(ptr(losses[1]))


def test_frame_local():
    h = _frame_holder()
    assert h == "<frame _frame_holder() local 'losses'>[1] -> Tensor"
    assert h.root_kind == "frame"


class Trainer:
    def __init__(self) -> None:
        self.cache: dict = {}


def test_instance_attribute_and_key():
    trainer = Trainer()
    trainer.cache["step7"] = torch.randn(5)
    h = one(ptr(trainer.cache["step7"]))
    assert h == ("<frame test_instance_attribute_and_key() local 'trainer'> -> "
                 "Trainer.cache['step7'] -> Tensor")


class Registry:
    items: list = []


def test_class_attribute():
    Registry.items.append(torch.randn(6))
    try:
        h = one(ptr(Registry.items[0]))
        assert h.endswith("Registry.items[0] -> Tensor") and h.root_kind == "class"
        assert " -> " not in h.removesuffix(" -> Tensor")  # the class itself is the root
    finally:
        Registry.items.clear()


def test_closure_names_the_captured_variable():
    def make():
        activations = torch.randn(7)
        return lambda: activations

    KEPT.append(make())
    h = one(ptr(KEPT[0]()))
    assert h == f"{__name__}.KEPT[0] -> <lambda> closure 'activations' -> Tensor"
    KEPT.append(lambda t=torch.randn(2): t)
    h = one(ptr(KEPT[1]()))
    assert h == f"{__name__}.KEPT[1] -> <lambda>.__defaults__[0] -> Tensor"


def test_exception_traceback_frame_local():
    def step(batch):
        raise RuntimeError("bad batch")

    try:
        step(torch.randn(8))
    except RuntimeError as e:
        KEPT.append(e)
    batch = next(v for v in gc.get_referents(KEPT[0].__traceback__.tb_next.tb_frame)
                 if isinstance(v, torch.Tensor))
    address = ptr(batch)
    del batch
    h = one(address)
    assert h == f"{__name__}.KEPT[0] -> RuntimeError.__traceback__ -> <frame step() local 'batch'> -> Tensor"


def test_graph_held_memory_names_the_saved_tensor():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    KEPT.append(torch.relu(lin(x)).sum())  # the graph keeps x (for the weight's gradient)
    address = ptr(x)
    del x
    [h] = find_holders({address: 32}, budget_s=WALK_BUDGET_S).holders()
    assert h == (f"{__name__}.KEPT[0] -> Tensor.grad_fn -> SumBackward0 -> ReluBackward0 -> "
                 "AddmmBackward0._saved_mat1 -> saved tensor")


def test_long_graph_chains_keep_first_and_last_node():
    a = torch.randn(3, requires_grad=True)
    b = a * 2.0
    y = b.sin()  # saves b
    for _ in range(5):
        y = y.cos()
    KEPT.append(y.sum())
    address = ptr(b)
    del b, y
    [h] = find_holders({address: 12}, budget_s=WALK_BUDGET_S).holders()
    assert h == (f"{__name__}.KEPT[0] -> Tensor.grad_fn -> SumBackward0 -> ... -> "
                 "SinBackward0._saved_self -> saved tensor")


def test_saved_tensor_hooks_are_not_run():
    calls = []

    def pack(t):
        calls.append("pack")
        return t.detach()  # not t itself: a saved output packed as itself is a cycle through C++

    def unpack(t):
        calls.append("unpack")
        return t

    x = torch.randn(5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        KEPT.append((x.exp()).sum())
    n_packs = len(calls)
    inner = KEPT[0].grad_fn.next_functions[0][0]._raw_saved_result.data
    address = ptr(inner)
    del inner
    h = one(address)
    assert "ExpBackward0._saved_result" in h
    assert calls == ["pack"] * n_packs  # no unpack


class Node:
    def __init__(self) -> None:
        self.partner = None
        self.payload = None


def test_reference_cycle_no_root_reaches():
    was = gc.isenabled()
    gc.disable()
    try:
        a, b = Node(), Node()
        a.partner, b.partner = b, a
        b.payload = torch.randn(9)
        address = ptr(b.payload)
        del a, b
        [h] = find_holders({address: 36}, budget_s=WALK_BUDGET_S).holders()
        assert h.root_kind == "cycle"
        assert h == "<reference cycle no root reaches: Node.partner -> Node.partner> -> Node.payload -> Tensor"
    finally:
        gc.collect()
        if was:
            gc.enable()


def test_memory_no_python_object_holds_is_said_plainly():
    search = find_holders({0x1234560: 64}, budget_s=WALK_BUDGET_S)
    [h] = search.holders()
    assert h.root_kind == "no_object" and h.startswith("<no Python object holds it")
    assert (h.allocation_count, h.held_bytes) == (1, 64)


def test_budget_zero_stops_early_and_says_so():
    KEPT.append(torch.randn(3))
    search = find_holders({ptr(KEPT[0]): 12, 0x1234560: 8}, budget_s=0)
    assert search.stopped_early
    assert "stopped early at its 0 s time budget" in search.note()
    assert all(h.root_kind in ("not_found", "module") for h in search.holders())
    assert any("budget ran out" in h for h in search.holders())


def test_holders_by_group_one_search_most_bytes_first():
    KEPT.extend([torch.randn(10), torch.randn(1)])
    other = {"k": torch.randn(100)}
    groups = {"a": {ptr(KEPT[0]): 40, ptr(other["k"]): 400}, "b": {ptr(KEPT[1]): 4}}
    by_group, search = holders_by_group(groups)
    assert [h.path for h in by_group["a"]] == [
        "<frame test_holders_by_group_one_search_most_bytes_first() local 'other'>['k'] -> Tensor",
        f"{__name__}.KEPT[0] -> Tensor"]
    assert by_group["b"] == [f"{__name__}.KEPT[1] -> Tensor"]
    assert search.objects_visited > 0


def test_holder_is_a_string_that_pickles():
    h = Holder("x.y[1] -> Tensor", 10, 2, "module")
    assert "y[1]" in h and h.path == "x.y[1] -> Tensor"
    back = pickle.loads(pickle.dumps(h))
    assert (back, back.held_bytes, back.allocation_count, back.root_kind) == (h, 10, 2, "module")
    assert h.format() == "x.y[1] -> Tensor  (2 allocations, 10 B)"


# -- what the search must not do ---------------------------------------------------
class Touchy:
    """Every hook a careless walker would call counts here."""

    calls = 0

    def __init__(self, t):
        object.__setattr__(self, "t", t)

    def __getattribute__(self, name):
        type(self).calls += 1
        return object.__getattribute__(self, name)

    def __getattr__(self, name):
        type(self).calls += 1
        raise AttributeError(name)

    def __repr__(self):
        type(self).calls += 1
        return "Touchy"

    def __eq__(self, other):
        type(self).calls += 1
        return False

    def __hash__(self):
        type(self).calls += 1
        return 1

    @property
    def __class__(self):
        type(self).calls += 1
        return Touchy


class Subclass(torch.Tensor):
    calls = 0

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.calls += 1
        return super().__torch_function__(func, types, args, kwargs or {})


def test_no_user_code_runs():
    KEPT.append({Touchy(1): Touchy(torch.randn(4))})  # a user object as key and on the path
    address = ptr(next(iter(KEPT[0].values())).t)
    dead = weakref.proxy(Trainer())  # a dead proxy raises on any access
    KEPT.append(dead)
    sub = torch.randn(3).as_subclass(Subclass)
    KEPT.append(sub)
    Touchy.calls = Subclass.calls = 0
    search = find_holders({address: 16, 0x1234560: 8}, budget_s=WALK_BUDGET_S)
    paths = search.holders()
    assert (Touchy.calls, Subclass.calls) == (0, 0)
    assert paths[0] == f"{__name__}.KEPT[0][<Touchy>] -> Touchy.t -> Tensor"
    assert search.error is None


def test_keeps_no_reference_and_restores_the_gc():
    KEPT.append(torch.randn(3))
    ref = weakref.ref(KEPT[0])
    before = sys.getrefcount(KEPT[0])
    seen = []
    gc.callbacks.append(lambda phase, info: seen.append(phase))
    try:
        assert gc.isenabled()
        find_holders({ptr(KEPT[0]): 12, 0x1234560: 8})
        assert gc.isenabled() and seen == []  # paused, no collection inside
    finally:
        gc.callbacks.pop()
    after = sys.getrefcount(KEPT[0])  # on its own line: assert rewriting would add a reference
    assert after == before
    KEPT.clear()
    assert ref() is None


def test_rebinding_a_local_after_the_search_frees_the_old_value():
    # Before Python 3.13, reading a running function's frame.f_locals fills a
    # snapshot dict that would keep the old value alive after the rebinding.
    batch = torch.randn(6)
    ref = weakref.ref(batch)
    find_holders({ptr(batch): 24})
    batch = torch.randn(6)
    assert ref() is None
    assert batch.numel() == 6


class Link:
    def __init__(self, parent):
        self.parent = parent
        self.data = None


def test_long_linked_chains_are_counted_not_written():
    head = None
    for _ in range(50):
        head = Link(head)
    tail = head
    while tail.parent is not None:
        tail = tail.parent
    tail.data = torch.randn(3)
    KEPT.append(head)
    address = ptr(tail.data)
    del head, tail
    h = one(address)
    assert h == f"{__name__}.KEPT[0] -> Link.parent x49 -> Link.data -> Tensor"


def test_graph_memory_held_only_by_the_graph_is_freed_after_the_search():
    lin = torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    ref = weakref.ref(x)
    KEPT.append(torch.relu(lin(x)).sum())
    address = ptr(x)
    del x
    [h] = find_holders({address: 32}, budget_s=WALK_BUDGET_S).holders()
    assert "_saved_mat1" in h
    KEPT.clear()  # the graph goes, and with it the saved input
    assert ref() is None


def test_a_holder_that_changed_while_the_search_ran(monkeypatch):
    from torchmem.analysis import _holder_walk

    real, calls = _holder_walk.first_referrers, []

    def moved(level, wanted):  # as if another thread took the inner list out of KEPT
        calls.append(1)
        return real(level, wanted) if len(calls) == 1 else [None] * len(wanted)

    monkeypatch.setattr(_holder_walk, "first_referrers", moved)
    KEPT.append([torch.randn(3)])
    h = one(ptr(KEPT[0][0]))
    assert h == "<its holder changed while the search ran> -> list[0] -> Tensor"
    assert h.root_kind == "not_found"
