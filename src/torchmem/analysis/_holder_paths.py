"""Writing a reference path, edge by edge (for holders.py; ``_holder_names`` names the edges).

A path reads like Python where it can (``__main__.history[12]``,
``Trainer.cache['step7']``), with `` -> `` where one object leads to the next
in a way that is not an expression: an attribute of an instance
(``-> Trainer.cache``), a function's closure (``-> <lambda> closure 'x'``), a
frame reached through a traceback (``-> <frame step() local 'batch'>``) or an
autograd graph (``Tensor.grad_fn -> MseLossBackward0 -> ... ->
AddmmBackward0._saved_mat1 -> saved tensor``). Long runs are shortened: more
than three autograd nodes keep the first and the last, a repeated segment is
written once with its count (``Record.parent x499``), and a path of more than
12 segments keeps its six first and five last.
"""

from __future__ import annotations

import types
from typing import Any

from ._holder_names import (
    ATTR, CLOSURE, GRAPH, LOCAL, NAMESPACE, SAVED, SKIP, SUB, VIA, Namer, code_name,
    generator_frame, key_text, type_name,
)


def render(namer: Namer, chain: list[Any], label: str, attrs_append: bool) -> tuple[str, str]:
    """(path, shape) of ``chain`` (root first, the tensor last).

    ``label`` names the root; ``attrs_append`` says the label is an
    expression (a module, a class) that ``.attr`` can follow. The shape
    is the path with every subscript written ``[*]``: paths of one shape
    are one holder (``history[0]``, ``history[1]``, ...).
    """
    out = _Path(label, attrs_append)
    n = len(chain)
    i = 0
    saved = False
    while i < n - 1:
        parent, child = chain[i], chain[i + 1]
        kind, name = namer.edge(parent, child)
        saved = kind == SAVED
        if kind == NAMESPACE and i + 2 < n:
            kind2, key = namer.edge(child, chain[i + 2])
            if kind2 == SUB and type(key) is str:
                out.attr(parent, key)
                i += 2
                _enter(namer, out, chain[i])
                continue
            kind, name = VIA, None
        if kind == CLOSURE and i + 3 < n:
            name = _closure_name(parent, chain[i + 1], chain[i + 2])
            if name is not None:
                out.new(f"{code_name(parent.__code__)} closure '{name}'",
                        f"{code_name(parent.__code__)} closure '{name}'")
                i += 3
                _enter(namer, out, chain[i])
                continue
            kind = VIA
        if kind == SUB:
            if i == 0 and out.attrs_append and type(name) is str and name.isidentifier():
                out.attr(parent, name)  # a module root's globals
            else:
                out.sub(name)
        elif kind == ATTR:
            out.attr(parent, name)
        elif kind == LOCAL:
            fn = code_name(parent.f_code) if type(parent) is types.FrameType else \
                code_name(generator_frame(parent).f_code)
            what = "frame" if type(parent) is types.FrameType else "generator"
            text = f"<{what} {fn}() local '{name}'>"
            if i == 0:
                out.replace(text)
            else:
                out.new(text, text)
        elif kind == GRAPH:
            out.node(type_name(type(child)))
        elif kind == SAVED:
            out.saved(parent, name)
        elif kind == SKIP:
            pass
        else:
            out.new(type_name(type(child)), type_name(type(child)), plain=True)
        i += 1
        if kind != GRAPH:
            _enter(namer, out, child)
    return out.finish("saved tensor" if saved else type_name(type(chain[-1])))

def _enter(namer: Namer, out: "_Path", obj: Any) -> None:
    # Entering an autograd node through an attribute (grad_fn): name its type.
    if namer.is_node(type(obj)) and not out.at_node:
        out.node(type_name(type(obj)))

def _closure_name(func: Any, cells: Any, cell: Any) -> str | None:
    try:
        idx = next(i for i, c in enumerate(tuple.__iter__(cells)) if c is cell)
        return func.__code__.co_freevars[idx]
    except Exception:
        return None


class _Path:
    """The segments of one path and of its shape, built edge by edge."""

    def __init__(self, label: str, attrs_append: bool) -> None:
        self.segs: list[tuple[str, str, bool]] = []  # (text, shape, is a graph node)
        self.cur, self.shape, self.graph = label, label, False
        self.attrs_append = attrs_append  # ``cur`` is an expression ``.attr`` can follow
        self.at_node = False

    def _push(self) -> None:
        self.segs.append((self.cur, self.shape, self.graph))

    def new(self, text: str, shape: str, plain: bool = False, graph: bool = False) -> None:
        self._push()
        self.cur, self.shape, self.graph = text, shape, graph
        self.attrs_append, self.at_node = plain, graph

    def replace(self, text: str) -> None:
        self.cur = self.shape = text
        self.attrs_append = False

    def sub(self, key: Any) -> None:
        self.cur += f"[{key}]" if type(key) is int else f"[{key_text(key)}]"
        self.shape += "[*]"
        self.attrs_append = self.at_node = False

    def attr(self, owner: Any, name: str) -> None:
        if self.attrs_append or issubclass(type(owner), (type, types.ModuleType)):
            self.cur += "." + name
            self.shape += "." + name
            self.attrs_append = self.at_node = False
        else:
            kind = code_name(owner.__code__) if type(owner) is types.FunctionType else \
                type_name(type(owner))
            text = f"{kind}.{name}"
            self.new(text, text)

    def node(self, name: str) -> None:
        self.new(name, name, plain=True, graph=True)

    def saved(self, node: Any, name: str) -> None:
        if self.at_node:
            self.cur += "." + name
            self.shape += "." + name
            self.attrs_append = self.at_node = False
        else:
            text = f"{type_name(type(node))}.{name}"
            self.new(text, text, graph=True)

    def finish(self, last: str) -> tuple[str, str]:
        if not (self.attrs_append and self.cur == last and not self.graph):
            self._push()
            self.cur, self.shape, self.graph = last, last, False
        self._push()
        segs = _shorten(_compress_repeats(_compress_graph(self.segs)))
        return " -> ".join(s[0] for s in segs), " -> ".join(s[1] for s in segs)


def _compress_graph(segs: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    # A run of more than three autograd nodes keeps its first and last: the
    # reader needs where the graph starts and which node saved the tensor.
    out: list[tuple[str, str, bool]] = []
    i = 0
    while i < len(segs):
        j = i
        while j < len(segs) and segs[j][2]:
            j += 1
        if j - i > 3:
            out += [segs[i], ("...", "...", True), segs[j - 1]]
            i = j
        elif j > i:
            out += segs[i:j]
            i = j
        else:
            out.append(segs[i])
            i += 1
    return out


def _compress_repeats(segs: list[tuple[str, str, bool]]) -> list[tuple[str, str, bool]]:
    # A linked structure (Record.parent -> Record.parent -> ...) is one segment "x N".
    out: list[tuple[str, str, bool]] = []
    i = 0
    while i < len(segs):
        j = i
        while j + 1 < len(segs) and segs[j + 1][:2] == segs[i][:2]:
            j += 1
        n = j - i + 1
        if n > 2:
            out.append((f"{segs[i][0]} x{n}", f"{segs[i][1]} x*", segs[i][2]))
        else:
            out += segs[i:j + 1]
        i = j + 1
    return out


def _shorten(segs: list[tuple[str, str, bool]], keep: int = 12) -> list[tuple[str, str, bool]]:
    # The root and the holder's end are what a reader needs; the middle of a very
    # long path is counted, not written.
    if len(segs) <= keep:
        return segs
    head, tail = segs[:keep // 2], segs[-(keep // 2 - 1):]
    gap = f"... {len(segs) - len(head) - len(tail)} more ..."
    return head + [(gap, "...", False)] + tail
