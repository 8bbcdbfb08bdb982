"""What torch's objects say about allocations, as marks (torchmem._contexts), for
torchmem.sources.context: the storages of the parameters and buffers of the
modules that ran (owner: the module holding them), their ``.grad``, the
tensors in ``optimizer.state`` and the tensors passed into an outermost
module's forward; and, per profiler, sending only the marks that say
something new.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from ._modules import tensors_in

__all__ = ["MarkSender", "Owners", "fresh_marks", "input_marks", "storage_marks",
           "use_native_marks"]

_NOT_LIVE = 2**64 - 1
_Tensor = torch.Tensor


class Owners:
    """Which module owns each parameter (weakly held), as its owner context."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[Any, int]] = {}  # id(param) -> (weakref, owner ctx)

    def owner_of(self, p: Any) -> int:
        entry = self._by_id.get(id(p))
        return entry[1] if entry is not None and entry[0]() is p else 0

    def model_marks(self, owned: list[tuple[Any, int]]) -> list:
        """Parameters, buffers and gradients of ``owned`` (an Anchor's owners():
        (module weakref, owner ctx) each), each owned by the module holding it
        (a shared one by the first, as named_parameters() names it), read from
        the modules' own dicts (no walk of the tree)."""
        marks: list[tuple[Any, str, int]] = []
        owners = self._by_id
        seen: set[int] = set()
        for ref, ctx in owned:
            module = ref()
            if module is None:
                continue
            for p in module._parameters.values():
                if p is None or id(p) in seen:
                    continue
                seen.add(id(p))
                entry = owners.get(id(p))
                if entry is None or entry[0]() is not p or entry[1] != ctx:
                    owners[id(p)] = (weakref.ref(p), ctx)
                marks.append((p, "parameter", ctx))
                if p.grad is not None:
                    marks.append((p.grad, "gradient", ctx))
            for b in module._buffers.values():
                if b is not None:
                    marks.append((b, "buffer", ctx))
        return marks

    def owned_marks(self, optimizer: Any, owned: list[tuple[Any, int]]
                    ) -> list[tuple[int, str, int]]:
        """The storage marks (address, category, ctx) of ``optimizer``'s state (None:
        no optimizer), then of ``owned``'s parameters, buffers and gradients
        (model_marks), then of the optimizer's gradients no model owns."""
        native = _native
        if native is not None:
            out = native.owned_marks(optimizer, owned, self._by_id)
            if out is not None:  # None: an optimizer whose state is not plain dicts
                return out
        marks = self.state_marks(optimizer) if optimizer is not None else []
        marks += self.model_marks(owned)
        if optimizer is not None:
            marks += self.unowned_grads(optimizer)
        return storage_marks(marks)

    def state_marks(self, optimizer: Any) -> list:
        """The tensors in ``optimizer.state``, owned by their parameter's module."""
        marks = []
        for p, state in optimizer.state.items():
            ctx = self.owner_of(p)
            values = state.values() if isinstance(state, dict) else ()
            for v in values:
                if isinstance(v, _Tensor):
                    marks.append((v, "optimizer_state", ctx))
        return marks

    def unowned_grads(self, optimizer: Any) -> list:
        """``.grad`` of the optimizer's parameters that no model that ran holds."""
        return [(p.grad, "gradient", 0) for group in optimizer.param_groups
                for p in group["params"] if p.grad is not None and not self.owner_of(p)]


def input_marks(args: tuple, kwargs: dict | None) -> list:
    """The tensors passed into an outermost module's forward."""
    tensors = list(tensors_in(args))
    if kwargs:
        tensors.extend(tensors_in(tuple(kwargs.values())))
    return [(x, "input", 0) for x in tensors]


# The C++ versions of storage_marks, Owners.owned_marks and MarkSender's
# comparison (sources/_autograd_hook: tensor_marks.cpp), once built: about
# 0.7 us a tensor less, on every tensor of every optimizer step.
_native: Any = None


def use_native_marks(module: Any) -> None:
    """Marks are made by ``module`` (the autograd hook extension), or in Python
    (None)."""
    global _native
    _native = module


def storage_marks(marks: list) -> list[tuple[int, str, int]]:
    """``(tensor, category, ctx)`` as ``(storage address, category, ctx)``; tensors
    without storage memory are left out."""
    native = _native
    if native is not None:
        return native.storage_marks(marks)
    out = []
    for x, category, ctx in marks:
        try:
            # The storage's start without building a storage object (~1 us).
            address = x.data_ptr() - x.storage_offset() * x.element_size()
        except Exception:  # a tensor subclass or meta tensor without one
            continue
        if address:
            out.append((address, category, ctx))
    return out


class MarkSender:
    """Sends a profiler only the marks that say something new."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        # address -> (allocation seq, category, ctx) of the last mark sent
        self._sent: dict[int, tuple[int, str, int]] = {}
        self._prune_at = 4096

    def note(self, marks: list[tuple[int, str, int]], withdraw: str | None = None,
             only_outside_modules: bool = False) -> None:
        """Sends the marks that say something new: the allocation live at the
        address (an address this profiler does not hold live is skipped) did not
        get this category and owner last time. ``withdraw``: a category whose
        earlier marks not repeated here are withdrawn ("none") while their
        allocation lives. ``only_outside_modules``: skip allocations a module's
        forward or backward made (a model's output passed into another model is
        that model's activation, not an input)."""
        prof = self.profiler
        if not marks and not (withdraw and self._sent):
            return
        found = prof.live_seqs([m[0] for m in marks])
        if only_outside_modules and any(actx for _, actx in found):
            phases = prof.context_table()
            keep = [i for i, (_, actx) in enumerate(found)
                    if not actx or actx >= len(phases) or phases[actx][1] == "other"]
            if len(keep) < len(marks):
                marks, found = [marks[i] for i in keep], [found[i] for i in keep]
        sent = self._sent
        native = _native
        new, stale = (native.fresh_marks(marks, found, sent, withdraw) if native is not None
                      else fresh_marks(marks, found, sent, withdraw))
        if stale:
            for address, (seq, _) in zip(stale, prof.live_seqs(stale)):
                if seq == sent[address][0]:
                    new.append((address, "none", 0))
                del sent[address]
        prof.add_marks(new, validate=False)  # from C or torch: ints in range
        if len(sent) > self._prune_at:  # forget allocations freed since
            keys = list(sent)
            for address, (seq, _) in zip(keys, prof.live_seqs(keys)):
                if seq != sent[address][0]:
                    del sent[address]
            self._prune_at = max(4096, 2 * len(sent))


def fresh_marks(marks: list[tuple[int, str, int]], found: list[tuple[int, int]],
                sent: dict[int, tuple[int, str, int]], withdraw: str | None
                ) -> tuple[list[tuple[int, str, int]], list[int]]:
    """MarkSender's comparison: (the marks that say something new, recorded in
    ``sent``; the addresses in ``sent`` of category ``withdraw`` not marked).
    ``found``: live_seqs' (seq, ctx) of each mark's address; an address not
    live, or seen earlier in ``marks``, is skipped."""
    new = []
    seen = set()
    for mark, (seq, _) in zip(marks, found):
        address, category, ctx = mark
        if seq == _NOT_LIVE or address in seen:
            continue
        seen.add(address)
        state = (seq, category, ctx)
        if sent.get(address) != state:
            sent[address] = state
            new.append(mark)
    stale = ([a for a, (_, c, _) in sent.items() if c == withdraw and a not in seen]
             if withdraw else [])
    return new, stale
