"""Naming one edge of a reference path without running user code (for holders.py).

Every lookup is type-level: a descriptor is taken from the namespace of the
object's type and only C-level ones (getset and member descriptors) are
called; containers are read with the C methods of dict, list, tuple and
deque. So a user's ``__getattr__``, ``__getattribute__``, property,
``__iter__``, ``__eq__`` or ``__repr__`` never runs, and keys are written with
``repr`` only when they are plain str, int, float, bool, None, bytes (or short
tuples of those).

Frame locals: on Python 3.13+ ``frame.f_locals`` is a read-through proxy (PEP
667). Before 3.13 reading it from a function's frame fills a snapshot dict
kept on the frame (the one ``locals()`` returns), which would keep the values
alive after the function rebinds them (a leak made by the leak finder). So
that snapshot is emptied again once read, unless a tracer (a debugger) is
attached to the frame and may write it back.
"""

from __future__ import annotations

import collections
import gc
import sys
import types
from typing import Any, Callable

CO_OPTIMIZED = 0x1
_HEAPTYPE = 1 << 9
_C_DESCRIPTORS = (types.GetSetDescriptorType, types.MemberDescriptorType)
_LOCALS_PROXY = sys.version_info >= (3, 13)

_type_name = type.__dict__["__name__"].__get__
_type_qualname = type.__dict__["__qualname__"].__get__
_type_module = type.__dict__["__module__"].__get__
_type_mro = type.__dict__["__mro__"].__get__
_type_namespace = type.__dict__["__dict__"].__get__  # a mappingproxy
_type_flags = type.__dict__["__flags__"].__get__
_proxy_get = types.MappingProxyType.get
_module_dict = types.ModuleType.__dict__["__dict__"].__get__
_exc_attrs = tuple((name, BaseException.__dict__[name].__get__)
                   for name in ("__traceback__", "__context__", "__cause__", "args"))
_KEY_TYPES = frozenset({str, int, float, bool, type(None), bytes})
_SEQUENCES = (list, tuple, collections.deque)
_GENERATORS = {types.GeneratorType: "gi_frame", types.CoroutineType: "cr_frame",
               types.AsyncGeneratorType: "ag_frame"}
_MISSING = object()

# Edge kinds, as returned by Namer.edge.
ATTR, SUB, LOCAL, CLOSURE, GRAPH, SAVED, SKIP, NAMESPACE, VIA = range(9)

# Root kinds (Holder.root_kind).
MODULE, FRAME, CLASS = "module", "frame", "class"
CYCLE, UNREACHED, NO_OBJECT, NOT_FOUND = "cycle", "unreached", "no_object", "not_found"


def type_name(tp: type) -> str:
    """``tp.__name__`` read from ``type`` itself (a metaclass cannot intercept it)."""
    try:
        return _type_name(tp)
    except Exception:
        return "?"


def class_label(cls: type) -> str:
    """``module.Qualname`` of a class (just ``Qualname`` for __main__ and builtins)."""
    try:
        qual = _type_qualname(cls)
        mod = _type_module(cls)
    except Exception:
        return type_name(cls)
    if type(mod) is not str or mod in ("__main__", "builtins"):
        return qual
    return f"{mod}.{qual}"


def is_heap_type(cls: type) -> bool:
    try:
        return bool(_type_flags(cls) & _HEAPTYPE)
    except Exception:
        return False


def class_attr(tp: type, name: str) -> Any:
    """What ``name`` is in the namespaces of ``tp``'s MRO (no descriptor is called)."""
    try:
        for klass in _type_mro(tp):
            value = _proxy_get(_type_namespace(klass), name, _MISSING)
            if value is not _MISSING:
                return value
    except Exception:
        pass
    return _MISSING


def c_attr(obj: Any, name: str) -> Any:
    """``obj.name`` when it is a C-level descriptor of ``type(obj)``, else _MISSING."""
    desc = class_attr(type(obj), name)
    if type(desc) in _C_DESCRIPTORS:
        return desc.__get__(obj, type(obj))
    return _MISSING


def instance_dict(obj: Any) -> dict | None:
    """``obj.__dict__`` through the type's own ``__dict__`` descriptor, or None."""
    if issubclass(type(obj), type):
        return class_dict(obj)
    if type(obj) is types.ModuleType or issubclass(type(obj), types.ModuleType):
        try:
            d = _module_dict(obj)
        except Exception:
            return None
        return d if type(d) is dict else None
    desc = class_attr(type(obj), "__dict__")
    if type(desc) is not types.GetSetDescriptorType:
        return None
    try:
        d = desc.__get__(obj, type(obj))
    except Exception:
        return None
    return d if type(d) is dict else None


def class_dict(cls: type) -> dict | None:
    """The dict behind ``cls.__dict__`` (the mappingproxy's only referent)."""
    try:
        inner = gc.get_referents(_type_namespace(cls))
    except Exception:
        return None
    return inner[0] if inner and type(inner[0]) is dict else None


def key_text(key: Any) -> str:
    """A dict key as ``repr`` for plain builtin values, else ``<TypeName>``."""
    tp = type(key)
    plain = tp in _KEY_TYPES or (tp is tuple and len(key) <= 4
                                 and all(type(k) in _KEY_TYPES for k in key))
    if plain:
        try:
            text = repr(key)
        except ValueError:  # an int past sys.get_int_max_str_digits()
            text = f"<{tp.__name__}>"
        return text if len(text) <= 60 else text[:57] + "..."
    return f"<{type_name(tp)}>"


def code_name(code: Any) -> str:
    """The function's own name (``step``, ``<lambda>``): short enough to read in a path."""
    try:
        return str(code.co_name)
    except Exception:
        return "?"


def frame_locals(frame: types.FrameType) -> list[tuple[str, Any]]:
    """``(name, value)`` of a frame's locals, leaving the frame as it was (module docstring)."""
    try:
        code = frame.f_code
        optimized = code.co_flags & CO_OPTIMIZED
        if not optimized and frame.f_locals is frame.f_globals:
            return []  # module-level code: the module root names these
        d = frame.f_locals
        if type(d) is dict:
            items = list(dict.items(d))
        elif _LOCALS_PROXY and type(d).__name__ == "FrameLocalsProxy":
            items = list(type(d).items(d))
        else:
            return []  # a custom mapping given to exec(): reading it could run user code
        if optimized and not _LOCALS_PROXY and frame.f_trace is None:
            dict.clear(d)
        return [(k, v) for k, v in items if type(k) is str]
    except Exception:
        return []


def generator_frame(gen: Any) -> types.FrameType | None:
    name = _GENERATORS.get(type(gen))
    if name is None:
        return None
    try:
        frame = c_attr(gen, name)
    except Exception:
        return None
    return frame if type(frame) is types.FrameType else None


class Namer:
    """Names the edges of paths found by one search (``_holder_paths.render`` writes them).

    ``virtual`` holds the edges the search made itself (a frame root's
    locals, a tensor's grad_fn, an autograd node's saved tensors): id(child)
    -> (id(parent), kind, name). ``is_node`` tells autograd nodes by type.
    Caches here hold references to the objects on paths: ``clear()`` drops them.
    """

    def __init__(self, is_node: Callable[[type], bool], tensor_getters: dict[str, Any]) -> None:
        self.virtual: dict[int, tuple[int, int, str]] = {}
        self.is_node = is_node
        self._getters = tensor_getters  # name -> C getter, for tensors
        self._index: dict[int, tuple[Any, dict[int, Any]]] = {}
        self._locals: dict[int, tuple[Any, list[tuple[str, Any]]]] = {}

    def clear(self) -> None:
        self.virtual.clear()
        self._index.clear()
        self._locals.clear()

    def locals_of(self, frame: Any) -> list[tuple[str, Any]]:
        entry = self._locals.get(id(frame))
        if entry is None:
            entry = self._locals[id(frame)] = (frame, frame_locals(frame))
        return entry[1]

    def remember_locals(self, frame: Any, items: list[tuple[str, Any]]) -> None:
        self._locals[id(frame)] = (frame, items)

    def _index_of(self, container: Any) -> dict[int, Any]:
        entry = self._index.get(id(container))
        if entry is None:
            tp = type(container)
            if issubclass(tp, dict):
                index = {id(v): k for k, v in list(dict.items(container))}
            elif issubclass(tp, list):
                index = {id(v): i for i, v in enumerate(list.copy(container))}
            elif issubclass(tp, tuple):
                index = {id(v): i for i, v in enumerate(tuple.__iter__(container))}
            else:  # deque
                index = {id(v): i for i, v in enumerate(list(collections.deque.__iter__(container)))}
            entry = self._index[id(container)] = (container, index)
        return entry[1]

    # -- one edge ----------------------------------------------------------
    def edge(self, parent: Any, child: Any) -> tuple[int, Any]:
        """(kind, name) of the reference from ``parent`` to ``child``."""
        v = self.virtual.get(id(child))
        if v is not None and v[0] == id(parent):
            return v[1], v[2]
        try:
            return self._edge(parent, child)
        except Exception:  # a concurrent mutation, an odd C type: unnamed, not fatal
            return VIA, None

    def _edge(self, parent: Any, child: Any) -> tuple[int, Any]:
        tp = type(parent)
        if issubclass(tp, dict):
            index = self._index_of(parent)
            if id(child) in index:
                return SUB, index[id(child)]
            return VIA, None  # a key, not a value
        if issubclass(tp, _SEQUENCES):
            index = self._index_of(parent)
            if id(child) in index:
                return SUB, index[id(child)]
            return VIA, None
        if tp is types.FrameType:
            return self._frame_edge(parent, child)
        if tp is types.TracebackType:
            return SKIP, None
        if tp is types.CellType:
            return ATTR, "cell_contents"
        if tp in _GENERATORS:
            frame = generator_frame(parent)
            if frame is not None:
                kind, name = self._frame_edge(frame, child)
                if kind == LOCAL:
                    return kind, name
            return VIA, None
        if tp is types.FunctionType:
            if child is parent.__closure__:
                return CLOSURE, None  # the renderer reads on through the cell
            for name in ("__defaults__", "__kwdefaults__", "__globals__"):
                if child is getattr(parent, name):
                    return ATTR, name
        if tp is types.MethodType:
            for name in ("__self__", "__func__"):
                if child is getattr(parent, name):
                    return ATTR, name
        if issubclass(tp, BaseException):
            for name, get in _exc_attrs:
                if child is get(parent):
                    return ATTR, name
        getters = self._getters
        if getters and issubclass(tp, getters["_base"]):
            for name in ("grad_fn", "grad"):
                try:
                    if child is getters[name](parent):
                        return ATTR, name
                except Exception:
                    pass
        d = instance_dict(parent)
        if d is not None:
            if child is d:
                return NAMESPACE, None
            name = self._index_of(d).get(id(child), _MISSING)
            if type(name) is str:
                return ATTR, name
        for klass in _type_mro(tp):
            for name, desc in list(_type_namespace(klass).items()):
                if type(desc) is types.MemberDescriptorType:
                    try:
                        if desc.__get__(parent, tp) is child:
                            return ATTR, name
                    except AttributeError:
                        pass
        return VIA, None

    def _frame_edge(self, frame: Any, child: Any) -> tuple[int, Any]:
        items = self.locals_of(frame)
        for name, value in items:
            if value is child:
                return LOCAL, name
        if type(child) is types.CellType:  # a cell variable: the snapshot holds its contents
            try:
                contents = child.cell_contents
            except ValueError:
                contents = _MISSING
            for name, value in items:
                if value is contents:
                    return LOCAL, name
        if child is frame.f_back:
            return ATTR, "f_back"
        if child is frame.f_globals:
            return ATTR, "f_globals"
        return VIA, None
