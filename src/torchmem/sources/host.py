"""Host (CPU and pinned) tensor tracking through a TorchDispatchMode.

Over 400 lines on purpose: the per-op path is one set of closures over shared
locals (each op pays for every attribute lookup); split across modules they
would become lookups.

Every op that runs on the thread that started the tracker (and on autograd's
engine threads, which inherit the mode) passes through ``__torch_dispatch__``.
For each CPU storage an op returns or takes that the tracker has not seen, it
reports ``track_allocation(data_ptr, nbytes, "CPU" | "Pinned", -1)`` and puts a
weak reference on the storage's Python object whose callback reports the free.

Why a weak reference is exact: since torch 2.1 a StorageImpl keeps its Python
object alive for as long as the StorageImpl lives ("PyObject preservation"),
so ``t.untyped_storage()`` returns the same object every time and that object
dies in the same instant as the StorageImpl. Its ``id()`` is therefore a
stable key for the StorageImpl, and the weakref callback runs at the moment
the memory is released.

Reentrancy: weakref callbacks run inside garbage collection, which can start
at any allocation, including allocations made by this module's own
bookkeeping. There is no lock: every shared update is a single dict operation
(atomic under the GIL), and a record is only ever removed by the callback of
its own storage, so a callback that interrupts a registration cannot touch the
storage being registered (that storage is alive, the code holds it).

Skipped on purpose (see docs/host-tracking.md):
- storages not on the CPU (GPU memory belongs to the GPU source), meta and
  fake tensors (no memory), sparse / mkldnn tensors and wrapper subclasses
  (no plain storage);
- zero-byte storages (no allocation; they are picked up if they grow);
- storages torch does not own (``torch.from_numpy``, ``frombuffer``, DLPack,
  mmap'ed loads): their ``resizable()`` is False. ``track_external=True``
  reports them too.
"""

from __future__ import annotations

import gc
import threading
import warnings
import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

from . import _storage_resize

__all__ = ["HostTracker", "tensors_in_gc"]

_Tensor = torch.Tensor
_Parameter = torch.nn.Parameter
_OpOverload = torch._ops.OpOverload
# Ops that change the size of a storage they return in place (besides every
# op with an out= argument).
_RESIZING = frozenset({"resize_", "resize_as_", "set_", "_resize_output_", "resize_as_sparse_"})


class _Registry:
    """What one profiler has been told is live; shared by all its trackers.

    Shared so that a second tracker (or a restarted one) on the same profiler
    does not report storages the first already reported.
    """

    __slots__ = ("profiler", "live", "active", "__weakref__")

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        # id(storage object) -> _Rec; see the module docstring for why id()
        # is a stable key while the storage lives.
        self.live: dict[int, _Rec] = {}
        self.active = 0  # trackers started on this profiler


# id(profiler) -> its registry, for lookup only. A registry holds its
# profiler, so the id cannot be reused while the entry exists.
_REGISTRIES: weakref.WeakValueDictionary[int, _Registry] = weakref.WeakValueDictionary()

# Registries with live records or started trackers, held strongly. Without
# this, a registry nobody references forms an unreachable cycle with its
# records (dict -> record -> callback -> dict); the collector would free the
# records, and CPython never runs the callback of a weakref that is itself
# garbage, so those frees would be lost.
_KEEP_ALIVE: dict[int, _Registry] = {}


def _registry_for(profiler: Any) -> _Registry:
    reg = _REGISTRIES.get(id(profiler))
    if reg is None or reg.profiler is not profiler:
        reg = _Registry(profiler)
        _REGISTRIES[id(profiler)] = reg
    return reg


class _Rec(weakref.ref):
    """A weak reference to a storage object that remembers what was reported."""

    __slots__ = ("key", "ptr", "nbytes", "kind")


def tensors_in_gc(with_grads: bool = False) -> list[torch.Tensor]:
    """Every tensor object the garbage collector tracks (and, with
    ``with_grads``, their ``.grad``): what HostTracker.adopt is given for
    tensors that existed before tracking started."""
    # type(), not isinstance(): isinstance asks objects for __class__, which
    # raises on dead weak proxies and warns on deprecated module attributes.
    found: list[torch.Tensor] = []
    tensor = _Tensor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if issubclass(type(obj), tensor):
                found.append(obj)
                if with_grads:
                    try:
                        grad = obj.grad if obj.requires_grad else None
                    except Exception:  # subclasses with unusual attributes
                        grad = None
                    if grad is not None:
                        found.append(grad)
    return found


class _ModeBase(TorchDispatchMode):
    # The stock TorchDispatchMode wraps __torch_dispatch__ in
    # torch._disable_dynamo, which costs about 13 us per op (measured on this
    # machine); instead the code objects are marked "skip" for Dynamo once, in
    # _skip_dynamo(), which costs nothing per op.
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False

    # With the default (False) torch.compile falls back to eager for as long
    # as the tracker is on, which would silently slow training down; True
    # lets compiled regions compile and run (their internals are not seen).
    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def _skip_dynamo(*codes: Any) -> None:
    try:
        ef = torch._C._dynamo.eval_frame
        skip = ef._FrameAction.SKIP
        for code in codes:
            ef.set_code_exec_strategy(code, ef._FrameExecStrategy(skip, skip))
    except Exception:  # an internal API; without it Dynamo may try to trace us
        pass


def _accelerator_present() -> bool:
    try:
        return bool(torch.accelerator.is_available())
    except Exception:
        return False


def _pinned_memory_possible() -> bool:
    """Whether a pinned block can exist: with CUDA, once some device has a context.

    Before that nothing is pinned, and the is_pinned() probe would itself make
    a context on the current device (about 500 MB on GPU 0); asking whether a
    context exists makes none. Other accelerators: always.
    """
    try:
        if not torch.cuda.is_available():
            return True
        has_context = torch._C._cuda_hasPrimaryContext
        return any(has_context(d) for d in range(torch.cuda.device_count()))
    except Exception:
        return False


class HostTracker:
    """Records CPU and pinned tensor storages into ``profiler``.

    ``start()`` pushes a dispatch mode on the calling thread; ``stop()`` pops
    it (same thread). Frees of storages reported while started keep being
    reported after ``stop()``, so the profiler's counters fall back to what is
    really live. Usable as a context manager.

    ``track_external``: also report storages whose memory torch does not own
    (``from_numpy`` and friends); off by default because that memory is not
    allocated by torch and two storages may share it.
    """

    def __init__(self, profiler: Any, *, track_external: bool = False) -> None:
        self.profiler = profiler
        self.track_external = track_external
        self._reg = _registry_for(profiler)
        self._live = self._reg.live
        self._mode: TorchDispatchMode | None = None
        self._thread: int | None = None
        # Pinned memory needs an accelerator; without one every host storage is
        # "CPU" and the is_pinned() probe (200 ns to 6 us) is skipped.
        self._is_pinned = _Tensor.is_pinned if _accelerator_present() else None
        self._pinned_possible = False  # until a CUDA context exists (then for good)
        self._dispatch = self._build()

    # -- public -----------------------------------------------------------
    @property
    def active(self) -> bool:
        """True between start() and stop()."""
        return self._mode is not None

    @property
    def live_count(self) -> int:
        """Number of storages currently reported live (by any tracker of the profiler)."""
        return sum(1 for r in list(self._live.values()) if r.nbytes)

    @property
    def live_bytes(self) -> int:
        """Bytes of the storages currently reported live."""
        return sum(r.nbytes for r in list(self._live.values()))

    def start(self) -> HostTracker:
        """Begin tracking ops on the calling thread. Idempotent."""
        if self._mode is not None:
            return self
        mode = type("_HostTrackerMode", (_ModeBase,), {"__torch_dispatch__": self._dispatch})()
        mode.__enter__()
        self._mode = mode
        self._thread = threading.get_ident()
        reg = self._reg
        reg.active += 1
        _KEEP_ALIVE[id(reg)] = reg
        # Storage resizes are not ops (FSDP frees with resize_(0)): watched apart.
        _storage_resize.watch(id(reg), self._storage_resized)
        return self

    def stop(self) -> None:
        """Stop seeing new ops. Idempotent; call it on the thread that started.

        Raises RuntimeError if another dispatch mode was pushed after this
        one and is still active (popping ours would pop theirs).
        """
        mode = self._mode
        if mode is None:
            return
        if threading.get_ident() != self._thread:
            raise RuntimeError("HostTracker.stop() must run on the thread that called start()")
        if _get_current_dispatch_mode() is not mode:
            raise RuntimeError("HostTracker.stop(): another dispatch mode is active above it")
        self._mode = None
        mode.__exit__(None, None, None)
        reg = self._reg
        reg.active -= 1
        if not reg.live and not reg.active:
            _KEEP_ALIVE.pop(id(reg), None)
            _storage_resize.unwatch(id(reg))

    def __enter__(self) -> HostTracker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def adopt(self, tensors: Any) -> None:
        """Report the storages of ``tensors`` (an iterable) now, without an op."""
        see = self._see
        for t in tensors:
            if isinstance(t, _Tensor):
                see(t, True)

    # -- machinery --------------------------------------------------------
    def _build(self):
        prof = self.profiler
        live = self._live
        live_get = live.get
        live_setdefault = live.setdefault
        live_pop = live.pop
        alloc = prof.track_allocation
        free = prof.track_deallocation
        realloc = prof.track_reallocation
        tracker = self
        reg = self._reg
        rid = id(reg)
        keep_alive = _KEEP_ALIVE
        external = self.track_external
        unwatch = _storage_resize.unwatch
        Tensor, Parameter, OpOverload = _Tensor, _Parameter, _OpOverload

        def on_dead(rec: _Rec) -> None:
            # Runs when the StorageImpl dies: possibly inside GC, inside an
            # allocation made by register(), or on another thread.
            try:
                if live_get(rec.key) is rec:
                    live_pop(rec.key, None)
                    if not live and not reg.active:
                        keep_alive.pop(rid, None)
                        unwatch(rid)
                n = rec.nbytes
                if n:
                    rec.nbytes = 0
                    free(rec.ptr, n)
            except Exception:
                pass

        def register(t: Any, s: Any, key: int) -> None:
            if type(t) is not Tensor and type(t) is not Parameter:
                if s.device.type != "cpu":  # fake tensors say cpu, store meta
                    return
            n = s.nbytes()
            if not n or (not external and not s.resizable()):
                return
            is_pinned = tracker._is_pinned
            if is_pinned is not None and not tracker._pinned_possible:
                tracker._pinned_possible = _pinned_memory_possible()
            kind = ("Pinned" if is_pinned is not None and tracker._pinned_possible
                    and is_pinned(t) else "CPU")
            add(s, key, n, kind)

        def add(s: Any, key: int, n: int, kind: str) -> None:
            rec = _Rec(s, on_dead)
            rec.key = key
            rec.ptr = s.data_ptr()
            rec.nbytes = n
            rec.kind = kind
            if live_setdefault(key, rec) is rec:
                keep_alive[rid] = reg
                alloc(rec.ptr, n, kind, -1)
            else:  # another thread registered it first
                rec.nbytes = 0

        def resized(rec: _Rec, s: Any, ptr: int) -> None:
            n = s.nbytes()
            old_ptr, old_n = rec.ptr, rec.nbytes
            if old_ptr == ptr and old_n == n:
                return
            rec.ptr, rec.nbytes = ptr, n
            if not old_n:
                if n:
                    alloc(ptr, n, rec.kind, -1)
            elif not n:
                free(old_ptr, old_n)
            else:
                realloc(old_ptr, ptr, n)

        def storage_resized(s: Any) -> None:
            # After UntypedStorage.resize_ (any thread): a known storage changed
            # size or moved; an unknown one that now holds memory is new.
            if not prof.is_enabled:
                return
            key = id(s)
            rec = live_get(key)
            if rec is not None:
                resized(rec, s, s.data_ptr())
            elif reg.active and s.device.type == "cpu":
                n = s.nbytes()
                if n and (external or s.resizable()):
                    pinned = tracker._is_pinned is not None and s.is_pinned()
                    add(s, key, n, "Pinned" if pinned else "CPU")

        def see(t: Any, check: bool) -> None:
            try:
                if not t.is_cpu:
                    return
                s = t.untyped_storage()
                key = id(s)
                rec = live_get(key)
                if rec is None:
                    register(t, s, key)
                elif check:
                    ptr = s.data_ptr()
                    if ptr != rec.ptr or s.nbytes() != rec.nbytes:
                        resized(rec, s, ptr)
            except Exception:  # sparse, mkldnn, wrapper subclasses: no storage
                pass

        # func -> whether it can resize a storage it returns (out= variants,
        # resize_/set_, mutating custom ops). Other outputs are either fresh or
        # alias a storage whose size the op cannot change, so they skip the
        # data_ptr/nbytes comparison.
        resizes: dict[Any, bool] = {}

        def may_resize(func: Any) -> bool:
            try:
                schema = func._schema
                name = schema.name.split("::")[-1]
                out = name in _RESIZING or any(a.is_out for a in schema.arguments) or (
                    func.namespace != "aten" and any(
                        a.alias_info is not None and a.alias_info.is_write
                        for a in schema.arguments))
            except Exception:
                out = True
            resizes[func] = out
            return out

        def dispatch(mode: Any, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            op = func._op if type(func) is OpOverload else func
            out = op(*args, **kwargs) if kwargs else op(*args)
            if not prof.is_enabled:
                return out
            # Inputs pick up tensors created before start(). The common case
            # (a plain CPU tensor already known) is inlined: this loop runs for
            # every argument of every op.
            for a in args:
                ta = type(a)
                if ta is Tensor or ta is Parameter:
                    if a.is_cpu:
                        try:
                            if id(a.untyped_storage()) in live:
                                continue
                        except Exception:  # sparse / mkldnn: no storage
                            continue
                        see(a, False)
                elif ta is list or ta is tuple:
                    if a and type(a[0]) is not int:
                        for b in a:
                            if isinstance(b, Tensor):
                                see(b, False)
                elif a is None or ta is int or ta is float or ta is bool:
                    pass
                elif isinstance(a, Tensor):
                    see(a, False)
            if kwargs:
                for a in kwargs.values():
                    if isinstance(a, Tensor):
                        see(a, True)
            check = resizes.get(func)
            if check is None:
                check = may_resize(func)
            to = type(out)
            if to is Tensor or to is Parameter:
                if check or not out.is_cpu:
                    see(out, True)
                else:
                    try:
                        if id(out.untyped_storage()) in live:
                            return out
                    except Exception:
                        return out
                    see(out, False)
            elif to is list or to is tuple:
                for b in out:
                    if isinstance(b, Tensor):
                        see(b, check)
                    elif type(b) is list or type(b) is tuple:  # e.g. foreach pairs
                        for c in b:
                            if isinstance(c, Tensor):
                                see(c, check)
            elif isinstance(out, Tensor):
                see(out, check)
            return out

        self._see = see
        self._storage_resized = storage_resized
        _skip_dynamo(dispatch.__code__, see.__code__, register.__code__, resized.__code__,
                     on_dead.__code__, may_resize.__code__, add.__code__,
                     storage_resized.__code__, _storage_resize._tracked_resize_.__code__)
        return dispatch
