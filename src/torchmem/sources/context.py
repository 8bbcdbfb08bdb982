"""Module and phase context for every allocation, from every module call and torch's hooks.

Each thread has a current context (csrc/context_table.hpp): the module running
and the phase. The recorder stamps it on every event, natively, whatever the
source (track_*, the CPU allocator hook, the CUDA plugin). This module keeps
it current:

- forward: a wrapper around ``nn.Module.__call__`` (``_module_call``: torch's
  global module hooks would cost every module call their own price) pushes
  and pops the module; its path is its name in the outermost
  running module's ``named_modules()``, the outermost named by its class
  (``Net``, ``Net.fc1``, ``Net.blocks.0.attn``);
- backward: no module backward hook (torch's full backward hooks wrap each
  module's outputs in a custom Function, which breaks ``ReLU(inplace=True)``
  after a BatchNorm). Instead, when a module's forward returns, a pre-hook on
  the autograd node that made its output (``grad_fn.register_prehook``) sets
  that module's backward context when the node is about to run; an input
  whose node no module claims gets a pre-hook that sets the calling module's
  context again (the parent's own ops between two children). Hooks return
  None: gradients are untouched. The first such hook of a backward pass marks
  its start; an engine callback restores the context when it ends;
- optimizer: optimizer step pre/post hooks.

It also tells the profiler what torch's objects say about allocations, as
marks (torchmem._contexts): the storages of the parameters and buffers of
the modules that ran (owner: the module holding them), their ``.grad``
storages, the tensors in ``optimizer.state`` and the tensors passed into an
outermost module's forward. Marks are sent only when something changed.

One set of hooks serves the whole process; each started ContextSource's
profiler receives the marks. Hooks never raise into the training run.

Over 400 lines for a reason: the forward, backward and optimizer hooks share
one per-thread stack and one claim of autograd nodes, whose Python and C++
paths must give the same contexts; split, each half would read the other's
tuples by index.
"""

from __future__ import annotations

import threading
import weakref
from functools import partial
from typing import Any

import torch

from .. import _recorder
from . import _module_call
from ._autograd_hook import NativeHooks
from ._marks import MarkSender, Owners, input_marks, storage_marks, use_native_marks
from ._modules import Anchor, module_path_name, tensors_in
from .._contexts import PHASE_INDEX

__all__ = ["ContextSource", "autograd_hooks", "build_autograd_hooks", "module_path_name"]

_FORWARD, _BACKWARD, _OPTIMIZER = (PHASE_INDEX[p] for p in ("forward", "backward", "optimizer"))

_set_context = _recorder.set_context
_get_context = _recorder.get_context
_intern = _recorder.intern_context
_graph_task_id = torch._C._current_graph_task_id
_grad_enabled = torch.is_grad_enabled
_Tensor = torch.Tensor


# A running module (or optimizer step) on a thread's stack, as a tuple (cheaper
# than an object on a path that runs twice per module call): the module, the
# context before it, its anchor (None: an optimizer step), its
# (forward ctx, backward ctx, path), whether it is an outermost module.
_MODULE, _PREV, _ANCHOR, _CTX, _ROOT = range(5)


class _Thread:
    """Per-thread state: the running modules, how autograd nodes are claimed
    (``claim(value, ctx)``: the C++ hooks, or Python's with ``claimed``, the
    nodes claimed during the current outermost forward), the backward pass
    (graph task) last seen."""

    __slots__ = ("stack", "claimed", "_claim", "task")

    def __init__(self) -> None:
        self.stack: list[tuple] = []
        self.claimed: dict[Any, int] = {}
        self.claim = partial(_claim_in_python, self.claimed)
        self.task = -1

    @property
    def claim(self) -> Any:
        return self._claim

    @claim.setter
    def claim(self, fn: Any) -> None:
        # Set on its own thread only: a thread on the C++ claim() gets the C++
        # forward hooks' fast paths (their per-thread entry is this stack).
        self._claim = fn
        native = _hooks.native_module
        if native is not None:
            native.bind_thread(self.stack if fn is native.claim else None)


_local = threading.local()  # .s: this thread's _Thread (one local lookup per hook)


def _thread() -> _Thread:
    try:
        return _local.s
    except AttributeError:
        t = _local.s = _Thread()
        return t


class _Hooks:
    """The process-wide hooks and the profilers that receive marks."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # Replaced, never changed in place (under lock): the hooks iterate it
        # without a copy.
        self.sources: tuple[ContextSource, ...] = ()
        self.handles: list[Any] = []
        self.anchors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        # id(module) -> (weakref, anchor, ctx) of the outermost modules that ran:
        # whose parameters each step's end marks, and where the C++ forward
        # paths find an outermost module's frame (use_roots).
        self.root_entries: dict[int, tuple] = {}
        self.owners = Owners()
        self.optimizer_ctx = _intern("", _OPTIMIZER)
        # The C++ node hooks, built in the background on first use; threads
        # switch to them at their next outermost forward.
        self.native = NativeHooks(self.mark_backward_start, self.use_native)
        self.native_claim: Any = None
        self.native_module: Any = None
        # Their forward hooks' common case (a named module inside a running
        # one), on threads that claim with native_claim.
        self.native_enter: Any = None
        self.native_exit: Any = None

    # -- installing -------------------------------------------------------------
    def add(self, source: ContextSource) -> None:
        with self.lock:
            if source in self.sources:
                return
            self.sources += (source,)
            # Even where hooks are already installed: a child forked while the
            # parent built the C++ hooks starts its own build here.
            self.native.start()
            if self.handles:
                return
            from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                               register_optimizer_step_pre_hook)

            self.handles = [
                register_optimizer_step_pre_hook(self.step_pre),
                register_optimizer_step_post_hook(self.step_post),
            ]
            _module_call.install()
            self.refresh_calls()

    def remove(self, source: ContextSource) -> None:
        with self.lock:
            self.sources = tuple(s for s in self.sources if s is not source)
            if self.sources or not self.handles:
                return
            _module_call.remove()
            for h in self.handles:
                h.remove()
            self.handles = []
        self.set(_thread(), 0)

    def refresh_calls(self) -> None:
        """Hands the module-call wrapper the current forward paths (the C++ ones
        once built)."""
        if self.handles:
            _module_call.set_calls(self.native_enter, self.forward_pre,
                                   self.native_exit, self.forward_post)

    @staticmethod
    def set(t: _Thread, ctx: int) -> None:
        _set_context(ctx)

    # -- forward ----------------------------------------------------------------
    # What _module_call runs around a module call when the C++ paths
    # (native_enter, native_exit) decline or are not built.
    def forward_pre(self, module: Any, args: tuple) -> None:
        try:
            t = _thread()
            stack = t.stack
            in_backward = _graph_task_id() != -1
            top = stack[-1] if stack else None
            if top is not None and top[_ANCHOR] is not None:
                anchor = top[_ANCHOR]
                entry = anchor.names.get(id(module))  # Anchor.lookup's fast path
                if entry is not None and entry[1] and entry[0]() is module:
                    ctx = entry[1]
                else:
                    ctx = anchor.lookup(module)
                if ctx is None:  # not below it: named from its caller's path
                    anchor = self.anchor(module,
                                         f"{top[_CTX][2]}.{module_path_name(module)}")
                    ctx = anchor.lookup(module)
                root = False
            else:  # outermost (perhaps inside an optimizer step: LBFGS's closure)
                if self.native_claim is not None and t.claim is not self.native_claim:
                    t.claim = self.native_claim  # built since: from this forward on
                anchor = self.anchor(module, module_path_name(module))
                ctx = anchor.lookup(module)
                root = True
                if not in_backward and ctx is not None and self.note_root(module, anchor, ctx):
                    self.mark_model(module, anchor)
            if ctx is None:
                return
            stack.append((module, _get_context(), anchor, ctx, root))
            _set_context(ctx[1] if in_backward else ctx[0])
            if not root and args and not in_backward and _grad_enabled():
                # Inputs made by the caller's own ops (no module claims their
                # node): once this module's backward is done, the caller's
                # context holds again.
                t.claim(args, top[_CTX][1])
        except Exception:  # never into the training run
            pass

    def forward_post(self, module: Any, args: tuple, kwargs: dict | None, result: Any,
                     done: Any) -> None:
        # kwargs and result are None when the forward raised; done is what
        # native_exit said (False: not handled, or not built).
        if type(done) is list:  # an outermost module's exit, done but its inputs' marks
            try:
                if done:
                    self.send(done, only_outside_modules=True)
            except Exception:
                pass
            return
        if done is not False:  # popped; the result's tensors are nested
            try:
                _thread().claim(list(tensors_in(result)), done)
            except Exception:
                pass
            return
        try:
            t = _thread()
            stack = t.stack
            if stack and stack[-1][_MODULE] is module:
                frame = stack.pop()
            else:
                for i in range(len(stack) - 1, -1, -1):
                    if stack[i][_MODULE] is module:
                        break
                else:
                    return  # its pre-hook did not run (it started while compiling)
                frame = stack[i]
                del stack[i:]  # frames above: forwards that raised
            _set_context(frame[_PREV])
            if result is not None and _grad_enabled() and _graph_task_id() == -1:
                t.claim(result if isinstance(result, _Tensor) else list(tensors_in(result)),
                        frame[_CTX][1])
            if frame[_ROOT]:
                t.claimed.clear()
                if _graph_task_id() == -1:
                    self.mark_inputs(args, kwargs)
        except Exception:
            pass

    def note_root(self, module: Any, anchor: Anchor, ctx: tuple) -> bool:
        """Remembers an outermost module (its entry goes with it); True the
        first time it runs as one."""
        key = id(module)
        entry = self.root_entries.get(key)
        first = entry is None or entry[0]() is not module
        if not first and entry[1] is anchor:
            return False
        entries = self.root_entries

        def gone(ref: Any, key: int = key) -> None:
            if entries.get(key, (None,))[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(module, gone), anchor, ctx)
        return first

    def use_native(self, native: Any) -> None:
        use_native_marks(native)
        native.use_roots(self.root_entries)
        self.native_module = native
        self.native_claim = native.claim
        self.native_enter = native.forward_enter
        self.native_exit = native.forward_exit
        with self.lock:
            self.refresh_calls()

    def mark_backward_start(self, task: int, ctx: int) -> None:
        # What the C++ hooks call on a pass's first claimed node (they restore
        # the context at its end themselves); backward_start's mark too.
        try:
            marks = [(0, "backward_start", ctx)]
            for source in self.sources:
                source.profiler.add_marks(marks, validate=False)
        except Exception:  # never into the training run
            pass

    def anchor(self, module: Any, prefix: str) -> Anchor:
        by_prefix = self.anchors.get(module)
        if by_prefix is None:
            by_prefix = self.anchors[module] = {}
        a = by_prefix.get(prefix)
        if a is None:
            a = by_prefix[prefix] = Anchor(module, prefix)
        return a

    # -- backward ---------------------------------------------------------------
    def backward_start(self, t: _Thread, task: int, ctx: int) -> None:
        """The first module node of a backward pass is about to run: it starts now."""
        if task != t.task:
            t.task = task
            self.mark_backward_start(task, ctx)
            ident = threading.get_ident()
            before = _get_context()

            def done() -> None:
                if threading.get_ident() == ident:
                    self.set(t, before)
                t.task = -1

            try:
                torch.autograd.Variable._execution_engine.queue_callback(done)
            except Exception:
                pass

    # -- optimizer --------------------------------------------------------------
    def step_pre(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            t = _thread()
            if t.stack:
                # A step runs between forwards: module frames left now are of
                # forwards whose end was never seen (a hook that failed).
                self.set(t, t.stack[0][_PREV])
                t.stack.clear()
            t.stack.append((optimizer, _get_context(), None,
                            (self.optimizer_ctx,) * 2 + ("",), False))
            self.set(t, self.optimizer_ctx)
        except Exception:
            pass

    def step_post(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        try:
            t = _thread()
            stack = t.stack
            while stack:
                frame = stack.pop()
                if frame[_MODULE] is optimizer:
                    self.set(t, frame[_PREV])
                    break
            # The step's end: its state, and every model's parameters, buffers
            # and gradients (parameters may have been replaced; a .grad set
            # to None but kept alive elsewhere is no longer a gradient).
            owned: list[tuple[Any, int]] = []
            for ref, anchor, _ in list(self.root_entries.values()):
                if ref() is not None:
                    owned += anchor.owners()
            self.send(self.owners.owned_marks(optimizer, owned), withdraw="gradient")
        except Exception:
            pass

    # -- marks (torchmem.sources._marks) ----------------------------------------
    def mark_model(self, root: Any, anchor: Anchor) -> None:
        self.send(self.owners.owned_marks(None, anchor.owners()))

    def mark_inputs(self, args: tuple, kwargs: dict | None) -> None:
        marks = input_marks(args, kwargs)
        if marks:
            self.send(storage_marks(marks), only_outside_modules=True)

    def send(self, marks: list[tuple[int, str, int]], withdraw: str | None = None,
             only_outside_modules: bool = False) -> None:
        """Storage marks (address, category, ctx) to every source, each sending its
        profiler what is new (MarkSender.note)."""
        for source in self.sources:
            source.sender.note(marks, withdraw, only_outside_modules)


# ctx -> the node pre-hook that enters it (one per context, shared by nodes).
_backward_hooks: dict[int, Any] = {}


def _backward_hook(ctx: int) -> Any:
    """The node pre-hook for context ``ctx``: sets it on the thread about to run
    the node (the first of a backward pass also marks its start); returns None,
    so gradients are untouched. A closure: it runs once per module node."""

    def hook(grad_outputs: Any) -> None:
        try:
            t = _thread()
            task = _graph_task_id()
            if task != t.task:
                _hooks.backward_start(t, task, ctx)
            _set_context(ctx)
        except Exception:  # never into the training run
            pass

    _backward_hooks[ctx] = hook
    return hook


def _claim_in_python(claimed: dict, value: Any, ctx: int) -> int:
    """The C++ hooks' ``claim`` in Python (their build failed, or is not done):
    the grad_fn of ``value`` (a tensor, or the tensors directly in a tuple or
    list) not claimed yet in this forward gets ``ctx``'s node pre-hook."""
    n = 0
    for x in (value,) if isinstance(value, _Tensor) else value:
        if isinstance(x, _Tensor):
            node = x.grad_fn
            if node is not None and node not in claimed:
                claimed[node] = ctx
                hook = _backward_hooks.get(ctx)
                node.register_prehook(hook if hook is not None else _backward_hook(ctx))
                n += 1
    return n


_hooks = _Hooks()


# How backward attribution claims nodes, and building its C++ hooks ahead of use.
autograd_hooks = _hooks.native.state_after
build_autograd_hooks = _hooks.native.build


class ContextSource:
    """Attribution for ``profiler``: module and phase context on every event it
    records, and marks for parameters, buffers, gradients, optimizer state and
    inputs. ``start()`` wraps ``nn.Module.__call__`` and installs torch's global
    optimizer hooks (once per process, shared by every started source);
    ``stop()`` removes them when no source is left.
    """

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self.sender = MarkSender(profiler)
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> ContextSource:
        """Installs the hooks (idempotent)."""
        _hooks.add(self)
        self._active = True
        return self

    def stop(self) -> None:
        """Removes this source; the hooks go when no source is left (idempotent)."""
        _hooks.remove(self)
        self._active = False

    def __enter__(self) -> ContextSource:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

