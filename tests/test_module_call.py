"""sources/_module_call.py: the nn.Module.__call__ wrapper attribution sees module calls through."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchmem.sources import _module_call as MC


class Inner(nn.Module):
    def forward(self, x, scale=1.0):
        return x * scale


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Inner()

    def forward(self, x):
        return self.inner(x, scale=2.0) + 1


class Raising(nn.Module):
    def forward(self, x):
        raise KeyError("from the forward")


@pytest.fixture
def wrapper():
    """The wrapper installed with calls of this test's own; the state before comes back."""
    was_installed, calls = MC._in_chain, MC._calls
    original = nn.Module.__call__
    MC.install()
    seen: list[tuple] = []

    def record(name, result=None):
        def call(*a):
            seen.append((name, type(a[0]).__name__) + tuple(a[1:]))
            return result
        return call

    MC.set_calls(record("fast_enter", False), record("enter"), record("fast_leave", False),
                 record("leave"))
    try:
        yield seen
    finally:
        if not was_installed:
            MC.remove()
            assert nn.Module.__call__ is original
        MC._calls = calls


def test_calls_around_each_module_call_in_order(wrapper):
    m = Outer()
    x = torch.ones(3)
    out = m(x)
    assert torch.equal(out, torch.full((3,), 3.0))
    names = [(s[0], s[1]) for s in wrapper]
    assert names == [("fast_enter", "Outer"), ("enter", "Outer"),
                     ("fast_enter", "Inner"), ("enter", "Inner"),
                     ("fast_leave", "Inner"), ("leave", "Inner"),
                     ("fast_leave", "Outer"), ("leave", "Outer")]
    inner_leave = wrapper[5]
    # leave(module, args, kwargs, result, done): the call's own arguments
    assert inner_leave[2] == (x,) and inner_leave[2][0] is x
    assert inner_leave[3] == {"scale": 2.0}
    assert torch.equal(inner_leave[4], torch.full((3,), 2.0)) and inner_leave[5] is False
    # fast_leave(module, result, args, kwargs): the same result and arguments
    inner_fast = wrapper[4]
    assert inner_fast[2] is inner_leave[4] and inner_fast[3] is inner_leave[2]
    assert inner_fast[4] is inner_leave[3]
    assert wrapper[7][4] is out


def test_fast_paths_that_succeed_skip_the_slow_ones(wrapper):
    MC.set_calls(lambda m, a: True, None, lambda m, r, a, k: True, None)  # None: never called
    assert torch.equal(Outer()(torch.ones(2)), torch.full((2,), 3.0))


def test_a_forward_that_raises_leaves_with_none_and_raises_on(wrapper):
    with pytest.raises(KeyError, match="from the forward"):
        Raising()(torch.ones(1))
    assert [s[0] for s in wrapper] == ["fast_enter", "enter", "fast_leave", "leave"]
    # fast_leave(module, None, args, None), the args leave sees
    assert wrapper[2][2] is None and wrapper[2][3] is wrapper[3][2] and wrapper[2][4] is None
    assert wrapper[3][3:] == (None, None, False)  # leave(module, args, None, None, done)


def test_module_hooks_still_run_and_leave_sees_what_they_return(wrapper):
    m = Inner()
    order = []
    m.register_forward_pre_hook(lambda mod, args: order.append("pre"))
    m.register_forward_hook(lambda mod, args, out: out + 10)
    out = m(torch.zeros(1))
    assert order == ["pre"] and out.item() == 10.0
    assert wrapper[-1][4] is out


def test_no_calls_after_remove_and_the_original_back():
    if MC._in_chain:
        pytest.skip("another test's source left the wrapper installed")
    original = nn.Module.__call__
    MC.install()
    assert MC.installed() and nn.Module.__call__ is not original
    MC.install()  # idempotent: one wrapper
    seen = []
    MC.set_calls(None, lambda m, a: seen.append("in"), None,
                 lambda m, a, k, r, d: seen.append("out"))
    Inner()(torch.ones(1))
    MC.remove()
    Inner()(torch.ones(1))
    assert seen == ["in", "out"]
    assert nn.Module.__call__ is original and not MC.installed()


def test_a_later_wrapper_is_kept_and_never_wrapped_twice():
    if MC._in_chain:
        pytest.skip("another test's source left the wrapper installed")
    original = nn.Module.__call__
    MC.install()
    ours = nn.Module.__call__
    theirs_seen = []

    def theirs(self, *a, **k):
        theirs_seen.append(type(self).__name__)
        return ours(self, *a, **k)

    nn.Module.__call__ = theirs
    seen = []
    try:
        MC.remove()  # cannot restore without dropping theirs: ours passes through
        assert nn.Module.__call__ is theirs
        Inner()(torch.ones(1))
        MC.install()  # still in their chain: not wrapped again (that would recurse)
        assert nn.Module.__call__ is theirs
        MC.set_calls(None, lambda m, a: seen.append("in"), None,
                     lambda m, a, k, r, d: seen.append("out"))
        Inner()(torch.ones(1))
        assert seen == ["in", "out"] and theirs_seen == ["Inner", "Inner"]
    finally:
        nn.Module.__call__ = ours  # they restore what they wrapped
        MC.remove()
    assert nn.Module.__call__ is original


def test_tracers_and_scripting_give_the_same_results_through_the_wrapper(wrapper):
    m = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    x = torch.randn(3, 4)
    with torch.no_grad():
        ref = m(x)
        scripted, traced = torch.jit.script(m), torch.jit.trace(m, x)
        graph = torch.fx.symbolic_trace(m)  # patches __call__ while tracing, then puts ours back
        assert MC.installed()
        entered = []
        for other in (scripted, traced, graph):
            wrapper.clear()
            assert torch.equal(other(x), ref)
            entered.append([s[1] for s in wrapper if s[0] == "enter"])
    # Scripted and traced modules run their submodules in C++: the outer call is
    # seen; the fx graph (a GraphModule subclass named after the model) calls its
    # submodules, which are seen too.
    assert entered == [["RecursiveScriptModule"], ["TopLevelTracedModule"],
                       ["Sequential", "Linear", "ReLU", "Linear"]]
