"""The C++ autograd node hooks (torchmem/_hook/autograd_context_hook.cpp) and their
Python fallback: the same context on every event, the same marks, the same run."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from torchmem.sources import context as C
from _attribution_helpers import CNN, MLP, Block, attributed, batches, same_run, train


def run_python(code: str, **env: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _settled() -> str:
    """The hooks' state once their build (started here if need be) is over."""
    return C.build_autograd_hooks(wait_s=300)


def _native_or_skip() -> None:
    state = _settled()
    # Only a machine without a compiler or Python's headers may lack them; a
    # failed build of our source is a failure.
    if state.startswith("python:") and ("no C++ compiler" in state or "Python.h" in state):
        pytest.skip(state)
    assert state == "native", state


@contextlib.contextmanager
def hooks_mode(mode: str):
    """Forces this thread (and threads started inside) onto one implementation."""
    _native_or_skip() if mode == "native" else _settled()
    h, t = C._hooks, C._thread()
    saved, saved_claim = h.native_claim, t.claim
    if mode == "python":
        h.native_claim = None
        t.claim = partial(C._claim_in_python, t.claimed)
    else:
        t.claim = h.native_claim
    try:
        yield
    finally:
        h.native_claim, t.claim = saved, saved_claim


def _record(make_model, make_opt, shape, classes, mode, **kw):
    with hooks_mode(mode), attributed() as prof:
        run = train(make_model, make_opt, batches(shape, classes), profiler=prof, **kw)
        rows = prof.event_rows_from(0)
        # Intra-op worker threads allocate too, in an order of their own (and
        # without a module context: attribution is per thread).
        rows = rows[rows["thread_id"] == threading.get_native_id()]
        events = [(int(k), int(s), prof.resolve_context(c)) for k, s, c in
                  zip(rows["kind"].tolist(), rows["size"].tolist(), rows["context_id"].tolist())]
        marks = prof.attribution_marks(0)
        starts = int((marks["category"] == marks["category"].dtype.type(
            _category_code(prof, "backward_start"))).sum()) if len(marks) else 0
    return run, events, starts


def _category_code(prof, name):
    from torchmem._contexts import MARK_CATEGORIES

    return MARK_CATEGORIES.index(name)


class Checkpointed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = MLP()
        self.out = nn.Linear(4, 4)

    def forward(self, x):
        return self.out(checkpoint(self.inner, x, use_reentrant=False))


@pytest.mark.parametrize("case", ["mlp", "cnn", "block", "checkpoint"])
def test_native_and_python_hooks_give_the_same_events(case):
    make, opt, shape, classes = {
        "mlp": (MLP, torch.optim.Adam, (8, 16), 4),
        "cnn": (CNN, partial(torch.optim.SGD, lr=0.1, momentum=0.9), (4, 3, 8, 8), 10),
        "block": (lambda: nn.Sequential(Block(), nn.Flatten(), nn.Linear(5 * 32, 3)),
                  torch.optim.AdamW, (2, 5, 32), 3),
        "checkpoint": (Checkpointed, torch.optim.Adam, (8, 16), 4),
    }[case]
    plain = train(make, opt, batches(shape, classes))
    # The first profiled run of a model in a process differs (MultiheadAttention's
    # first backward orders two small allocations otherwise): not compared.
    _record(make, opt, shape, classes, "python")
    py_run, py_events, py_starts = _record(make, opt, shape, classes, "python")
    nat_run, nat_events, nat_starts = _record(make, opt, shape, classes, "native")
    assert same_run(plain, py_run) and same_run(plain, nat_run)
    # Allocations in program order; frees at the end follow Python's collection
    # of the run's objects, whose order is not the hooks' business.
    allocs = [e for e in nat_events if e[0] == 0]
    assert allocs == [e for e in py_events if e[0] == 0]
    assert sorted(nat_events) == sorted(py_events)
    backward = [e for e in allocs if e[2][1] == "backward"]
    assert backward and any(m for _, _, (m, _) in backward)
    assert nat_starts == py_starts == 3  # one backward start per step


class _DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 16)

    def forward(self, x):
        return {"h": self.a(x), "extra": [x * 2]}  # nested: claimed by Python


class _TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b = nn.Linear(16, 16)

    def forward(self, x):
        y = self.b(x)
        return y, y.relu()  # flat: claimed by C++


class _Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("caught by the caller")


class _Varied(nn.Module):
    """Every case of the C++ forward hooks' fast paths and of their way out."""

    def __init__(self) -> None:
        super().__init__()
        self.d, self.t, self.r, self.head = _DictOut(), _TupleOut(), _Raises(), nn.Linear(16, 4)

    def forward(self, x):
        a, b = self.t(self.d(x)["h"])
        try:
            self.r(a)
        except RuntimeError:
            pass
        a2, _ = self.t(b)  # called twice
        return self.head(a + a2)


def test_forward_fast_paths_give_the_python_forward_hooks_events():
    _native_or_skip()
    h = C._hooks
    outcomes: dict[str, int] = {}
    enter, leave = h.native_enter, h.native_exit

    def counted(fn, name):
        def call(*a):
            r = fn(*a)
            key = (f"{name} {r!r}" if isinstance(r, bool) else
                   f"{name} inputs {len(r)}" if isinstance(r, list) else f"{name} ctx")
            outcomes[key] = outcomes.get(key, 0) + 1
            return r
        return call

    args = (_Varied, torch.optim.Adam, (8, 16), 4)
    plain = train(*args[:2], batches(*args[2:]))
    _record(*args, "native")
    # The C++ claim() with the Python forward hooks: what the fast paths replace
    # (the Python claim() keeps claimed nodes, and their saved tensors, alive
    # longer, so its frees come later).
    h.native_enter = h.native_exit = None
    try:
        slow_run, slow_events, slow_starts = _record(*args, "native")
    finally:
        h.native_enter, h.native_exit = counted(enter, "enter"), counted(leave, "exit")
    try:
        fast_run, fast_events, fast_starts = _record(*args, "native")
    finally:
        h.native_enter, h.native_exit = enter, leave
    assert same_run(plain, slow_run) and same_run(plain, fast_run)
    assert fast_events == slow_events and fast_starts == slow_starts == 3
    # 9 module calls a step, 3 steps: the outermost module goes to Python on its
    # first way in (1), and so does each of the 6 modules below it the first
    # time (the Python hook names it); the other 20 calls in, and all 27 out,
    # are C++: d's dict output left to Python to claim (3), the outermost
    # module's one input mark left to Python to send (3).
    assert outcomes == {"enter False": 7, "enter True": 20, "exit True": 21,
                        "exit ctx": 3, "exit inputs 1": 3}



class _Inputs(nn.Module):
    """An outermost module called with positional tensors, tensor keywords,
    nested arguments, and a forward that raises."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, *rest, scale=None, fail=False):
        for r in rest:  # a list of tensors is nested; None is not a tensor
            if r is not None:
                x = x + (sum(r) if isinstance(r, list) else r)
        if fail:
            raise ValueError("from the forward")
        y = self.fc(x)
        return y * scale if scale is not None else y


def _input_calls(native: bool) -> tuple[list, list]:
    """Input marks and the thread's context after each call, the C++ paths on or off."""
    h = C._hooks
    enter, leave = h.native_enter, h.native_exit
    lists = []  # what the C++ exit handed back for Python to send

    def counted_leave(*a):
        r = leave(*a)
        if isinstance(r, list):
            lists.append(len(r))
        return r

    h.native_enter, h.native_exit = (enter, counted_leave) if native else (None, None)
    try:
        with attributed() as prof:
            torch.manual_seed(0)
            m = _Inputs()
            after = []
            names = {}  # storage address -> which input (the tensors kept alive)
            for i in range(3):  # the first call of an outermost module is Python's
                x, b = torch.randn(2, 4), torch.randn(2, 4)
                scale, ones = torch.full((1,), 2.0), torch.ones(2, 4)
                names.update({t.data_ptr(): f"{n}{i}" for n, t in
                              (("x", x), ("b", b), ("scale", scale), ("ones", ones))})
                m(x, b, scale=scale)
                after.append(C._get_context())
                m(x, [b, ones])
                with pytest.raises(ValueError, match="from the forward"):
                    m(x, fail=True)
                after.append(C._get_context())
                with torch.no_grad():
                    m(x, None)
                after.append(C._get_context())
            marks = prof.attribution_marks(0)
            inputs = marks[marks["category"] == _category_code(prof, "input")]
            out = [(int(q), names.get(int(a))) for q, a in zip(inputs["seq"].tolist(),
                                                               inputs["address"].tolist())]
    finally:
        h.native_enter, h.native_exit = enter, leave
    return out, after, lists


def test_outermost_module_paths_give_the_python_paths_input_marks():
    _native_or_skip()
    fast, fast_after, lists = _input_calls(native=True)
    slow, slow_after, none = _input_calls(native=False)
    # A round: x, b and scale are new; then the ones (x and b marked already);
    # the two calls of x alone add nothing.
    assert [n for _, n in fast] == [f"{n}{i}" for i in range(3)
                                    for n in ("x", "b", "scale", "ones")]
    assert fast == slow
    assert fast_after == slow_after == [0] * 9
    # C++ handed back the input marks of every call but the nested ones (the
    # first call's too: its way in was Python's, its way out is C++): 3
    # tensors, then x alone when it raised and under no_grad; the sender
    # drops the repeats.
    assert lists == [3, 1, 1] * 3 and none == []



def test_an_outermost_module_is_remembered_only_while_it_lives():
    import gc
    import weakref

    _native_or_skip()
    with attributed():
        m = _Inputs()
        m(torch.randn(2, 4))
        key, ref = id(m), weakref.ref(m)
        entry = C._hooks.root_entries[key]
        assert entry[0]() is m and entry[2][2] == "_Inputs"
        del m, entry
        gc.collect()
        assert ref() is None  # torchmem held it weakly
        assert key not in C._hooks.root_entries


def test_claim_marks_each_node_once():
    _native_or_skip()
    from torchmem.sources._autograd_hook import load

    native = load()
    x = torch.randn(3, requires_grad=True)
    y, z = x * 2, x + 1
    assert native.claim(x, 5) == 0  # a leaf has no node
    assert native.claim(y, 5) == 1 and native.claim(y, 6) == 0  # the first claim holds
    assert native.is_claimed(y) and not native.is_claimed(z)
    assert native.claim((y, z, "not a tensor", None), 7) == 1
    assert native.claim([], 1) == 0 and native.claim(None, 1) == 0
    with pytest.raises(ValueError, match="16 bits"):
        native.claim(z, 70000)
    with pytest.raises(TypeError):
        native.claim(z)
    (y.sum() + z.sum()).backward()  # hooks that return the gradients unchanged
    assert torch.equal(x.grad, torch.full((3,), 3.0))


def test_without_a_compiler_the_python_hooks_attribute_backward(tmp_path):
    out = run_python("""
        import warnings
        import torch, torchmem
        from torch import nn
        from torchmem.sources.context import autograd_hooks
        warnings.simplefilter("ignore")  # the dispatch-mode fallback says so
        p = torchmem.enable(trace=False, summary=False, gc=False, auto_snapshot=False)
        state = autograd_hooks(wait_s=60)
        m = nn.Linear(4, 4)
        m(torch.randn(2, 4, requires_grad=True)).sum().backward()
        rows = p.event_rows_from(0)
        phases = {p.resolve_context(c) for c in rows["context_id"].tolist()}
        print(state)
        print(("Linear", "backward") in phases)
    """, TORCHMEM_CACHE_DIR=str(tmp_path), CXX="", PATH=str(tmp_path))
    state, seen = out.strip().splitlines()[-2:]
    assert state.startswith("python: ") and "compiler" in state
    assert seen == "True"


def test_the_environment_variable_keeps_the_python_hooks():
    out = run_python("""
        from torchmem import MemoryProfiler
        from torchmem.sources.context import ContextSource, autograd_hooks
        with ContextSource(MemoryProfiler(auto_snapshot=False)):
            print(autograd_hooks(wait_s=60))
    """, TORCHMEM_AUTOGRAD_HOOKS="python")
    assert out.strip().splitlines()[-1] == "python: TORCHMEM_AUTOGRAD_HOOKS=python"


@contextlib.contextmanager
def python_marks():
    """Marks made by _marks.py's Python code while inside."""
    from torchmem.sources import _marks

    saved = _marks._native
    _marks.use_native_marks(None)
    try:
        yield
    finally:
        _marks.use_native_marks(saved)


def test_native_storage_marks_are_the_python_ones():
    _native_or_skip()
    from torchmem.sources import _marks
    from torchmem.sources._autograd_hook import load

    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    p = nn.Parameter(torch.randn(3, 3))
    marks = [(base, "parameter", 1), (base[1:, 2:], "gradient", 2), (base.t(), "buffer", 3),
             (p, "parameter", 4), (torch.empty(0), "input", 0),
             (torch.empty(2, device="meta"), "input", 0), (torch.ones(5, dtype=torch.int8)[3:],
                                                           "optimizer_state", 7)]
    native = load().storage_marks(list(marks))
    with python_marks():
        python = _marks.storage_marks(list(marks))
    assert native == python
    start = base.untyped_storage().data_ptr()
    assert native[:4] == [(start, "parameter", 1), (start, "gradient", 2), (start, "buffer", 3),
                          (p.untyped_storage().data_ptr(), "parameter", 4)]
    assert len(native) == 5  # the empty and the meta tensor have no storage memory
    with pytest.raises(TypeError):
        load().storage_marks(tuple(marks))


class _Tied(nn.Module):
    """Two Linears sharing one weight, a BatchNorm (buffers), a frozen Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 6)
        self.b = nn.Linear(6, 6)
        self.b.weight = self.a.weight
        self.bn = nn.BatchNorm1d(6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(self.bn(self.b(self.a(x))))


def _owned_marks_both_ways(model: nn.Module, opt: Any) -> tuple[list, list, dict, dict]:
    from torchmem.sources._marks import Owners
    from torchmem.sources._modules import Anchor

    owned = Anchor(model, type(model).__name__).owners()
    native_owners, python_owners = Owners(), Owners()
    native = native_owners.owned_marks(opt, owned)
    with python_marks():
        python = python_owners.owned_marks(opt, owned)
    by_id = lambda o: {k: (ref(), ctx) for k, (ref, ctx) in o._by_id.items()}  # noqa: E731
    return native, python, by_id(native_owners), by_id(python_owners)


def test_native_owned_marks_are_the_python_ones():
    _native_or_skip()
    torch.manual_seed(0)
    model = _Tied()
    extra = nn.Parameter(torch.randn(3))  # in the optimizer, in no model: an unowned gradient
    opt = torch.optim.Adam([*[p for p in model.parameters() if p.requires_grad], extra])
    for _ in range(2):
        opt.zero_grad()
        (model(torch.randn(4, 6)).sum() + extra.sum()).backward()
        opt.step()
    native, python, native_by_id, python_by_id = _owned_marks_both_ways(model, opt)
    assert native == python
    assert native_by_id == python_by_id
    address = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    state = [address(v) for s in opt.state.values() for v in s.values()
             if isinstance(v, torch.Tensor)]
    # State first (step counts are tensors too), then the model, then the extra gradient.
    assert [m[0] for m in native[:len(state)]] == state
    assert {m[1] for m in native[:len(state)]} == {"optimizer_state"}
    params = [(address(p), "parameter") for p in model.parameters()]  # the tied weight once
    model_part = native[len(state):-1]
    assert [(a, c) for a, c, _ in model_part if c == "parameter"] == params
    assert sorted(a for a, c, _ in model_part if c == "gradient") == sorted(
        address(p.grad) for p in model.parameters() if p.grad is not None)
    assert sorted(a for a, c, _ in model_part if c == "buffer") == sorted(
        address(b) for b in model.buffers())
    assert native[-1] == (address(extra.grad), "gradient", 0)
    # The tied weight is owned by the first module holding it.
    assert native_by_id[id(model.b.weight)][1] == native_by_id[id(model.a.bias)][1]


def test_native_owned_marks_without_an_optimizer_and_with_sparse_gradients():
    _native_or_skip()
    emb = nn.Embedding(10, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    native, python, native_by_id, python_by_id = _owned_marks_both_ways(emb, opt)
    assert native == python  # a sparse gradient has no storage memory of its own: left out
    assert [c for _, c, _ in native] == ["parameter"]
    assert native_by_id == python_by_id
    native, python, _, _ = _owned_marks_both_ways(emb, None)
    assert native == python == [(emb.weight.untyped_storage().data_ptr(), "parameter",
                                 native[0][2])]


def test_native_owned_marks_read_an_unusual_optimizer_in_python():
    _native_or_skip()
    from torchmem.sources._autograd_hook import load

    p = nn.Parameter(torch.ones(2))
    m = torch.ones(2)

    class State:  # not a dict: the C version declines (None), Python reads .items()
        def items(self) -> list:
            return [(p, {"m": m})]

    class Odd:
        state = State()
        param_groups = [{"params": [p]}]

    assert load().owned_marks(Odd(), [], {}) is None
    native, python, _, _ = _owned_marks_both_ways(nn.ReLU(), Odd())
    assert native == python == [(m.untyped_storage().data_ptr(), "optimizer_state", 0)]
    with pytest.raises(TypeError):
        load().owned_marks(None, (), {})


def test_native_fresh_marks_are_the_python_ones():
    _native_or_skip()
    from torchmem.sources._autograd_hook import load
    from torchmem.sources._marks import fresh_marks

    gone = 2**64 - 1
    calls = [
        # (marks, found, withdraw)
        ([(16, "parameter", 3), (32, "gradient", 3), (16, "buffer", 4), (48, "gradient", 5)],
         [(1, 0), (2, 0), (1, 0), (gone, 0)], "gradient"),
        ([(16, "parameter", 3), (32, "gradient", 3)], [(1, 0), (2, 0)], "gradient"),  # nothing new
        ([(16, "parameter", 3), (64, "gradient", 3)], [(1, 0), (9, 0)], "gradient"),  # 32 is stale
        ([(16, "parameter", 7), (64, "gradient", 3)], [(1, 0), (10, 0)], None),  # ctx, seq changed
        ([], [], "gradient"),
    ]
    native_sent: dict = {}
    python_sent: dict = {}
    results = []
    for marks, found, withdraw in calls:
        n = load().fresh_marks(list(marks), list(found), native_sent, withdraw)
        p = fresh_marks(list(marks), list(found), python_sent, withdraw)
        assert (list(n[0]), list(n[1])) == (p[0], p[1])
        assert native_sent == python_sent
        results.append(p)
    assert results[0] == ([(16, "parameter", 3), (32, "gradient", 3)], [])
    assert results[1] == ([], [])
    assert results[2] == ([(64, "gradient", 3)], [32])
    assert results[3] == ([(16, "parameter", 7), (64, "gradient", 3)], [])
    assert results[4] == ([], [32, 64])
    assert python_sent == {16: (1, "parameter", 7), 32: (2, "gradient", 3),
                           64: (10, "gradient", 3)}
    with pytest.raises(TypeError):
        load().fresh_marks([(1, "x", 0)], [], {}, None)  # a found row missing


def test_compiled_autograd_runs_with_the_native_hooks():
    # Its own process: torch.compile and compiled autograd leave global state
    # (dynamo's caches, lazily made tensors) that exact-byte tests after it see.
    _native_or_skip()
    out = run_python("""
        import warnings
        import torch
        from torch._dynamo import compiled_autograd
        from _attribution_helpers import MLP, attributed
        from torchmem.sources.context import autograd_hooks, build_autograd_hooks
        warnings.simplefilter("ignore")
        x = torch.randn(8, 16)

        def run():
            torch.manual_seed(0)
            m = MLP()
            with compiled_autograd._enable(torch.compile(backend="eager")):
                m(x).sum().backward()
            return [p.grad.clone() for p in m.parameters()]

        print(build_autograd_hooks(wait_s=300))
        plain = run()
        with attributed() as prof:
            got = run()
            rows = prof.event_rows_from(0)
        print(all(torch.equal(a, b) for a, b in zip(plain, got)))
        print(("MLP.fc1", "forward") in {prof.resolve_context(c)
                                        for c in rows["context_id"].tolist()})
    """, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The hooks stay out of the compiled backward graph rather than fail it.
    assert out.split()[-3:] == ["native", "True", "True"], out
