"""Every module call seen through ``nn.Module.__call__``, not torch's global module hooks.

Why: a global forward hook, even an empty one, makes every module call leave
``nn.Module._call_impl``'s fast path (hook lists built and walked, a call per
hook): 2-5 µs a module call on a 2-core VM, more than attribution's own work
(docs/performance.md, "Attribution"). A wrapper around ``__call__`` costs one
Python frame and passes the arguments through unchanged.

Under Dynamo the wrapper calls the wrapped ``__call__`` at once
(``is_dynamo_compiling()`` is folded to True where Dynamo traces it), so a
compiled graph is the same as without torchmem, with no graph break; and
``torch.compile`` no longer warns that global module hooks are installed.

What runs around a call is four callables (``set_calls``): ``fast_enter(module,
args) -> bool`` (True: done) and ``enter(module, args)`` before it,
``fast_leave(module, result, args, kwargs)`` (True: done; anything else is handed on) and
``leave(module, args, kwargs, result, done)`` after it; the ``fast_`` ones may
be None. A forward that raises leaves with ``result`` and ``kwargs`` None, as
torch's always-called forward hooks see it, and the exception goes on.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch

__all__ = ["install", "installed", "remove", "set_calls"]

_dynamo_compiling = getattr(torch.compiler, "is_dynamo_compiling", torch.compiler.is_compiling)
if hasattr(torch.compiler, "_is_compiling_flag"):
    _compiler: Any = torch.compiler
else:  # an older torch: the flag read through is_compiling()
    class _CompilerFlag:
        @property
        def _is_compiling_flag(self) -> bool:
            return torch.compiler.is_compiling()

    _compiler = _CompilerFlag()

_lock = threading.Lock()
_wrapped: Callable[..., Any] | None = None  # the __call__ found at install
_in_chain = False  # the wrapper is (as far as known) what __call__ leads to
# Whether _wrapped is torch's own _wrapped_call_impl, whose two lines the
# wrapper then does itself (_compiled_call_impl: Module.compile()).
_STOCK = getattr(torch.nn.Module, "_wrapped_call_impl", None)
_stock = False
# (fast_enter, enter, fast_leave, leave) or None: pass through. One tuple read
# once per call, so a call that started with it also ends with it.
_calls: tuple | None = None


def _module_call(self: Any, *args: Any, **kwargs: Any) -> Any:
    calls = _calls
    # is_dynamo_compiling() first: with the flag alone (torch 2.13 holds it True
    # through a compile) Dynamo recompiled the model on each of 3 calls.
    if calls is None or _dynamo_compiling() or _compiler._is_compiling_flag:
        return _wrapped(self, *args, **kwargs)  # type: ignore[misc]
    fast_enter, enter, fast_leave, leave = calls
    if fast_enter is None or not fast_enter(self, args):
        enter(self, args)
    # Left None when the forward raises: the way out is then told so.
    result = given = None
    try:
        if _stock:  # torch's _wrapped_call_impl, without its frame (a third of the cost)
            compiled = self._compiled_call_impl
            result = (self._call_impl if compiled is None else compiled)(*args, **kwargs)
        else:
            result = _wrapped(self, *args, **kwargs)  # type: ignore[misc]
        given = kwargs
        return result
    finally:
        done = fast_leave(self, result, args, given) if fast_leave is not None else False
        if done is not True:
            leave(self, args, given, result, done)


def set_calls(fast_enter: Any, enter: Any, fast_leave: Any, leave: Any) -> None:
    """What the wrapper runs around each module call from now on (see the module's
    docstring); ``enter`` and ``leave`` must never raise."""
    global _calls
    _calls = (fast_enter, enter, fast_leave, leave)


def install() -> None:
    """Wraps ``nn.Module.__call__`` (idempotent). Calls pass straight through
    until ``set_calls``."""
    global _wrapped, _in_chain, _stock
    with _lock:
        if _in_chain:  # installed, or left in place under a later wrapper
            return
        _wrapped = torch.nn.Module.__call__
        _stock = _wrapped is _STOCK and hasattr(torch.nn.Module, "_compiled_call_impl")
        torch.nn.Module.__call__ = _module_call  # type: ignore[method-assign]
        _in_chain = True


def installed() -> bool:
    """Whether ``nn.Module.__call__`` is the wrapper now."""
    return torch.nn.Module.__call__ is _module_call


def remove() -> None:
    """Calls pass through from now on; ``nn.Module.__call__`` gets back what the
    wrapper wrapped, unless something wrapped it again since (restoring would
    drop that: the wrapper then stays, passing through)."""
    global _calls, _in_chain
    with _lock:
        _calls = None
        if torch.nn.Module.__call__ is _module_call and _wrapped is not None:
            torch.nn.Module.__call__ = _wrapped  # type: ignore[method-assign]
            _in_chain = False
