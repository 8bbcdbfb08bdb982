"""Roots and the breadth-first walk of a holder search (step 1 and 2 of holders.py's docstring)."""

from __future__ import annotations

import os
import sys
import threading
import time
import types
from itertools import compress
from typing import Any

from .._heap import HeapWalk
from . import _holder_names as hn
from ._holder_names import CLASS, FRAME, MODULE, NOT_FOUND
from ._holder_paths import render

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_CHUNK = 16384  # objects whose referents are read in one call (the budget is checked between)
first_referrers = HeapWalk.first_referrers  # a module name, so a test can stand in


class _Torch:
    """The few torch entry points the walk calls, all C-level (None without torch)."""

    def __init__(self) -> None:
        torch = sys.modules.get("torch")  # never import it: no torch, no tensors
        base = getattr(getattr(torch, "_C", None), "TensorBase", None) if torch else None
        self.base = base
        if base is None:
            return
        ns = base.__dict__
        self.storage = ns["untyped_storage"]
        self.grad_fn = ns["grad_fn"].__get__
        self.grad = ns["grad"].__get__
        self.is_leaf = ns["is_leaf"].__get__
        self.requires_grad = ns["requires_grad"].__get__
        # __torch_function__ of tensor subclasses would run on every getter.
        self.no_subclass_fn = torch._C.DisableTorchFunctionSubclass


class Walk:
    """The state of one search; ``clear()`` drops every reference it took.

    The walk goes level by level (all objects at distance d, then d + 1)
    and the per-edge work is native (``_heap.HeapWalk``: tp_traverse and a
    set of addresses, csrc/heap_walk.cpp). Parents are not stored per object:
    a found tensor's path is rebuilt afterwards by finding, level by level,
    the first object of the level above that refers to it. The first object
    of a level (roots in ``_root_list`` order) wins ties.
    """

    def __init__(self, targets: set[int], deadline: float) -> None:
        self.targets = targets
        self.deadline = deadline
        self.torch = _Torch()
        self.found: dict[int, tuple[Any, int]] = {}  # address -> (a tensor owning it, its level)
        self.heap = HeapWalk()  # the objects walked (addresses: no references)
        self.levels: list[list[Any]] = []
        self.vparent: dict[int, Any] = {}  # id(child) -> parent, for edges the walk made
        self.roots: dict[int, tuple[str, str, bool]] = {}  # id(root) -> (label, kind, attrs append)
        self.keep: list[Any] = []  # objects the walk made (nodes, saved tensors): alive while it runs
        self.kinds: dict[type, Any] = {}
        self.visited = 0
        self.stopped = False
        t = self.torch
        getters = ({"_base": t.base, "grad_fn": t.grad_fn, "grad": t.grad}
                   if t.base is not None else {})
        self.namer = hn.Namer(self._is_node, getters)

    def clear(self) -> None:
        for container in (self.found, self.heap, self.levels, self.vparent, self.roots,
                          self.keep, self.kinds):
            container.clear()
        self.namer.clear()

    # -- kinds of objects ----------------------------------------------------
    def _kind(self, tp: type) -> Any:
        kind = self.kinds.get(tp, False)
        if kind is not False:
            return kind
        kind = None
        base = self.torch.base
        try:
            if base is not None and issubclass(tp, base):
                kind = "tensor"
            elif type(hn.class_attr(tp, "next_functions")) is types.GetSetDescriptorType:
                saved = tuple(n for n in type.__dir__(tp) if n.startswith("_raw_saved_"))
                variable = type(hn.class_attr(tp, "variable")) is types.GetSetDescriptorType
                kind = ("node", saved, variable)
        except Exception:
            kind = None
        self.kinds[tp] = kind
        return kind

    def _is_node(self, tp: type) -> bool:
        return type(self._kind(tp)) is tuple

    def _special(self, level: list[Any], depth: int) -> list[tuple[Any, Any, int, str]]:
        """Tensors and autograd nodes of ``level``: checks the tensors' storages,
        returns the edges the GC does not show as (parent, child, kind, name)."""
        kinds = self.kinds
        tps = set(map(type, level))
        for tp in tps.difference(kinds):
            self._kind(tp)
        special = {tp for tp in tps if kinds[tp] is not None}
        if not special:
            return []
        out: list[tuple[Any, Any, int, str]] = []
        for obj in compress(level, map(special.__contains__, map(type, level))):
            for child, kind, name in self._extra(obj, kinds[type(obj)], depth):
                out.append((obj, child, kind, name))
        return out

    def _extra(self, obj: Any, kind: Any, depth: int) -> list[tuple[Any, int, str]]:
        """The edges of ``obj`` the GC does not show: (child, kind, name)."""
        t = self.torch
        out: list[tuple[Any, int, str]] = []
        if kind == "tensor":
            try:
                ptr = t.storage(obj).data_ptr()
            except Exception:  # sparse, meta, fake or wrapper tensors: no storage of ours
                ptr = 0
            if ptr in self.targets and ptr not in self.found:
                self.found[ptr] = (obj, depth)
            try:
                fn = t.grad_fn(obj)
                if fn is not None:
                    out.append((fn, hn.ATTR, "grad_fn"))
                elif t.is_leaf(obj) and t.requires_grad(obj):
                    g = t.grad(obj)
                    if g is not None:
                        out.append((g, hn.ATTR, "grad"))
            except Exception:
                pass
            return out
        _node, saved, variable = kind
        try:
            for fn, _i in hn.c_attr(obj, "next_functions"):
                if fn is not None:
                    out.append((fn, hn.GRAPH, None))
        except Exception:
            pass
        for raw_name in saved:
            try:
                raw = hn.c_attr(obj, raw_name)
                items = raw if type(raw) in (tuple, list) else (raw,)
                name = "_saved_" + raw_name[len("_raw_saved_"):]
                for j, item in enumerate(items):
                    data = item.data  # the saved value as stored: no unpack hook runs
                    if data is not None:
                        out.append((data, hn.SAVED, name if items is not raw else f"{name}[{j}]"))
            except Exception:  # freed by backward(), or an odd node
                pass
        if variable:
            try:
                v = hn.c_attr(obj, "variable")
                if v is not None and v is not hn._MISSING:
                    out.append((v, hn.ATTR, "variable"))
            except Exception:
                pass
        return out

    # -- roots ---------------------------------------------------------------
    def _root_list(self) -> list[tuple[Any, str, str, bool]]:
        """(object, label, kind, attrs append) in the order they win ties."""
        mods = []
        for name, mod in list(sys.modules.items()):
            if type(name) is not str or not issubclass(type(mod), types.ModuleType):
                continue
            d = hn.instance_dict(mod)
            if d is not None:
                mods.append((d, name, MODULE, True))
        main = [m for m in mods if m[1] == "__main__"]
        frames = []
        try:
            current = sys._current_frames()
        except Exception:
            current = {}
        me = current.pop(threading.get_ident(), None)
        for top in ([me] if me is not None else []) + list(current.values()):
            f = top
            while f is not None:
                if not f.f_code.co_filename.startswith(_PKG_DIR):
                    frames.append((f, f"<frame {hn.code_name(f.f_code)}()>", FRAME, False))
                f = f.f_back
        del current, me
        classes = []
        for cls in _all_classes():
            if hn.is_heap_type(cls):
                classes.append((cls, hn.class_label(cls), CLASS, True))
            else:
                # The GC does not traverse static (C) types; their namespaces hold
                # no user data, but walking them keeps their ~40K descriptors out
                # of the unreached step.
                ns = hn.class_dict(cls)
                if ns is not None:
                    classes.append((ns, hn.class_label(cls), CLASS, True))
        return main + frames + [m for m in mods if m[1] != "__main__"] + classes

    # -- the walk --------------------------------------------------------------
    def run(self, search: Any) -> None:
        """Fills ``search`` (a HolderSearch): paths, objects visited, stopped early."""
        with (self.torch.no_subclass_fn() if self.torch.base is not None else _nothing()):
            self._forward()
            for addr, path in self._paths().items():
                search.paths[addr] = path
            missing = self.targets - set(self.found)
            if missing and not self.stopped:
                for container in (self.found, self.levels, self.vparent, self.keep):
                    container.clear()
                self.namer.clear()
                from ._holder_unreached import Unreached

                Unreached(self, missing).run(search)
        search.objects_visited = self.visited
        search.stopped_early = self.stopped

    def _forward(self) -> None:
        heap, roots, namer, vparent, keep = self.heap, self.roots, self.namer, self.vparent, \
            self.keep
        level: list[Any] = []
        for obj, label, kind, attrs in self._root_list():
            if heap.add(obj):
                roots[id(obj)] = (label, kind, attrs)
                level.append(obj)
        self.levels.append(level)
        extra = []
        for obj in level:
            if type(obj) is types.FrameType:
                items = hn.frame_locals(obj)
                namer.remember_locals(obj, items)
                extra += [(obj, v, hn.LOCAL, k) for k, v in items]
        extra += self._special(level, 0)
        clock, deadline, want = time.perf_counter, self.deadline, len(self.targets)
        depth = 0
        while len(self.found) < want:
            nxt: list[Any] = []
            for i in range(0, len(level), _CHUNK):
                nxt += heap.expand(level, i, i + _CHUNK)
                self.visited += min(_CHUNK, len(level) - i)
                if clock() > deadline:
                    self.stopped = True
                    return
            for parent, child, kind, name in extra:
                if heap.add(child):
                    vparent[id(child)] = parent
                    namer.virtual[id(child)] = (id(parent), kind, name)
                    keep.append(child)
                    nxt.append(child)
            if not nxt:
                return  # the reachable heap is done
            level = nxt
            depth += 1
            self.levels.append(level)
            extra = self._special(level, depth)

    def _paths(self) -> dict[int, tuple[str, str, str]]:
        """The path of every found tensor, rebuilt level by level from the tensor up."""
        chains = {addr: [obj] for addr, (obj, _d) in self.found.items()}
        at = {addr: d for addr, (_o, d) in self.found.items()}
        for depth in range(max(at.values(), default=0), 0, -1):
            wanted = {id(chains[a][-1]): chains[a][-1] for a in chains if at[a] == depth}
            if not wanted:
                continue
            parents = {i: self.vparent[i] for i in wanted if i in self.vparent}
            rest = set(wanted).difference(parents)
            if rest:
                rest_objs = [wanted[i] for i in rest]
                found = first_referrers(self.levels[depth - 1], rest_objs)
                parents.update((id(o), p) for o, p in zip(rest_objs, found))
            for a in chains:
                if at[a] == depth:
                    chains[a].append(parents.get(id(chains[a][-1])))
                    at[a] = depth - 1
        out = {}
        for addr, chain in chains.items():
            if any(o is None for o in chain):
                # Another thread took an object out of the one that referred to it
                # while the walk ran: the path from there down is still true.
                chain = chain[:[o is None for o in chain].index(True)]
                chain.reverse()
                label = "<its holder changed while the search ran>"
                if len(chain) > 1:
                    label += f" -> {hn.type_name(type(chain[0]))}"
                path, shape = render(self.namer, chain, label, False)
                out[addr] = (path, shape, NOT_FOUND)
                continue
            chain.reverse()
            label, kind, attrs = self.roots.get(id(chain[0]), ("?", "?", False))
            path, shape = render(self.namer, chain, label, attrs)
            out[addr] = (path, shape, kind)
        return out


def _all_classes() -> list[type]:
    """Every class, found through ``__subclasses__`` from ``object`` (a metaclass cannot intercept it)."""
    out: list[type] = []
    seen: set[int] = set()
    todo = [object]
    subclasses = type.__subclasses__
    while todo:
        cls = todo.pop()
        if id(cls) in seen:
            continue
        seen.add(id(cls))
        out.append(cls)
        try:
            todo.extend(subclasses(cls))
        except Exception:
            pass
    return out


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
