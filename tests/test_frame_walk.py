"""The stack walk (csrc/frame_walk.cpp: the interpreter's frames on CPython 3.11,
frame objects elsewhere) gives the frames Python's own traceback gives: file
and line of each, innermost first, in every kind of frame."""

from __future__ import annotations

import sys
import threading
import traceback

import pytest

from torchmem import _native

DEPTH = 12


def _captured() -> list[tuple[str, int]]:
    """The caller's frames (this function's own left out)."""
    frames = _native.resolve_stack(_native.capture_stack(DEPTH + 1))
    return [(f, line) for f, line, _ in frames][1:]


def _expected(stack: traceback.StackSummary) -> list[tuple[str, int]]:
    return [(s.filename, s.lineno) for s in reversed(stack)][:DEPTH]


def _both() -> tuple[list, list]:
    # One line: the traceback's innermost line is the capture's.
    stack = traceback.extract_stack(); got = _captured()  # noqa: E702
    return got, _expected(stack)


def _nested(n: int) -> tuple[list, list]:
    return _nested(n - 1) if n else _both()


def _generator():
    yield _both()


async def _coroutine():
    return _both()


class _Made:
    def __init__(self) -> None:
        self.pair = _both()


def test_this_python_reads_the_interpreter_frames_where_it_can():
    expected = ("interpreter frames" if sys.version_info[:2] == (3, 11) else "frame objects")
    assert _native.stack_walk() == expected


@pytest.fixture(params=["interpreter frames", "frame objects"])
def walk(request):
    """Each walk this Python has (both on 3.11: they must agree)."""
    if _native.stack_walk(request.param == "interpreter frames") != request.param:
        _native.stack_walk(True)
        pytest.skip(f"this Python has no {request.param} walk")
    yield request.param
    _native.stack_walk(True)


@pytest.mark.parametrize("where", ["nested", "generator", "coroutine", "init", "lambda",
                                   "comprehension", "except", "thread", "traced"])
def test_the_walk_gives_the_tracebacks_frames(walk, where):
    if where == "nested":
        got, want = _nested(5)
    elif where == "generator":
        got, want = next(_generator())
    elif where == "coroutine":
        coro = _coroutine()
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        got, want = stop.value.value
    elif where == "init":
        got, want = _Made().pair
    elif where == "lambda":
        got, want = (lambda: _both())()
    elif where == "comprehension":
        got, want = [_both() for _ in range(1)][0]
    elif where == "except":
        try:
            raise ValueError
        except ValueError:
            got, want = _both()
    elif where == "thread":
        out = []
        t = threading.Thread(target=lambda: out.append(_both()))
        t.start()
        t.join()
        got, want = out[0]
    else:
        sys.settrace(lambda *a: None)
        try:
            got, want = _nested(3)
        finally:
            sys.settrace(None)
    assert len(got) == min(DEPTH, len(want))
    assert got == want
