"""Naming modules and finding their tensors, for torchmem.sources.context.

A module's path is its name in the outermost running module's
``named_modules()``, the outermost named by its class (``Net``, ``Net.fc1``,
``Net.blocks.0.attn``); a module called under another that does not contain
it is named after its caller's path and its own class, and names its own
children. Modules are held only by weak references.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .. import _recorder
from .._contexts import PHASE_INDEX

__all__ = ["Anchor", "module_path_name", "tensors_in", "unwrapped"]

_FORWARD, _BACKWARD = PHASE_INDEX["forward"], PHASE_INDEX["backward"]
_intern = _recorder.intern_context
_Tensor = torch.Tensor


def unwrapped(module: torch.nn.Module) -> torch.nn.Module:
    """A torch.compile wrapper's original module (the module itself otherwise).

    Through ``_modules``: a missing attribute costs nn.Module.__getattr__ an
    exception, tens of microseconds."""
    inner = module.__dict__.get("_modules", {}).get("_orig_mod")
    return inner if inner is not None else module


def module_path_name(module: torch.nn.Module) -> str:
    """The name an outermost module gets: its class (a torch.compile wrapper's
    original module's class)."""
    return type(unwrapped(module)).__name__


class Anchor:
    """A module whose ``named_modules()`` names the modules below it: the outermost
    running module, or a module called under it that it does not contain."""

    __slots__ = ("module", "prefix", "names", "owned", "__weakref__")

    def __init__(self, module: torch.nn.Module, prefix: str) -> None:
        self.module = weakref.ref(module)
        self.prefix = prefix
        # id(module) -> (weakref, (forward ctx, backward ctx), path); None: not below it
        self.names: dict[int, Any] = {}
        self.owned: list[tuple[Any, int]] | None = None  # (weakref, owner ctx), see owners()
        self.rebuild()

    def rebuild(self) -> None:
        root = self.module()
        if root is None:
            return
        tree = unwrapped(root)
        names = {id(root): (weakref.ref(root), self.prefix)}
        for name, m in tree.named_modules():
            names.setdefault(id(m), (weakref.ref(m), f"{self.prefix}.{name}" if name
                                     else self.prefix))
        self.names = {k: (ref, None, path) for k, (ref, path) in names.items()}
        self.owned = None

    def owners(self) -> list[tuple[Any, int]]:
        """Every module below this anchor with the context naming it as an owner
        (phase "other"), built once per rebuild: the step's end reads their
        parameters and buffers without walking the tree again."""
        if self.owned is None:
            # Weak references: torchmem must never keep a model alive.
            self.owned = [(ref, _intern(path, 0)) for ref, _, path in self.names.values()
                          if path is not None]
        return self.owned

    def lookup(self, module: torch.nn.Module) -> tuple | None:
        """``(forward ctx, backward ctx, path)`` of a module below this anchor, or None."""
        entry = self.names.get(id(module))
        if entry is None or entry[0]() is not module:
            self.rebuild()  # a module added or replaced since
            entry = self.names.get(id(module))
            if entry is None or entry[0]() is not module:
                # Not below it (remembered, so it is not rebuilt on every call).
                self.names[id(module)] = (weakref.ref(module), False, None)
                return None
        ref, ctx, path = entry
        if ctx is False:
            return None
        if ctx is None:
            ctx = (_intern(path, _FORWARD), _intern(path, _BACKWARD), path)
            self.names[id(module)] = (ref, ctx, path)
        return ctx


def tensors_in(value: Any):
    """Tensors in a module's inputs or output: a tensor, or (nested one level
    deep and in dicts) sequences of them; other containers through pytree."""
    if isinstance(value, _Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            if isinstance(v, _Tensor):
                yield v
            elif isinstance(v, (tuple, list, dict)):
                yield from tensors_in(v)
    elif isinstance(value, dict):
        yield from tensors_in(tuple(value.values()))
    elif value is not None:
        try:
            from torch.utils._pytree import tree_leaves

            for v in tree_leaves(value):
                if isinstance(v, _Tensor):
                    yield v
        except Exception:
            return
