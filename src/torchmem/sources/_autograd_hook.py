"""The C++ autograd node pre-hooks of torchmem.sources.context, built against
the installed torch at first use (``torchmem/_hook/autograd_context_hook.cpp``).

``load()`` returns the extension module (``claim(value, ctx)``, ``install``,
``is_claimed``; the module forward paths ``forward_enter``, ``forward_exit``,
``bind_thread`` and ``use_roots``: ``module_forward.cpp``; ``storage_marks``
and an optimizer step's marks, ``owned_marks`` and ``fresh_marks``:
``tensor_marks.cpp``) or raises BuildUnavailable; context.py
then keeps its Python node hooks, which do the same at several µs more per
module call.
:class:`NativeHooks` builds and installs it in the background (about 15 s
with g++ once per torch build, then a cached import), so ``enable()`` never
waits for the compiler. ``TORCHMEM_AUTOGRAD_HOOKS=python`` keeps the Python
hooks.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sysconfig
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

from . import _build
from ._build import BuildUnavailable

__all__ = ["BuildUnavailable", "NativeHooks", "load"]

_NAME = "torchmem_autograd_context_hook"  # its PyInit_ name


def _check() -> None:
    include = sysconfig.get_paths().get("include")
    if not include or not (Path(include) / "Python.h").is_file():
        raise BuildUnavailable("Python's C headers (Python.h) are missing "
                               "(install the python3-dev package)")


def _spec() -> _build.ModuleSpec:
    return _build.ModuleSpec(
        name="autograd_context_hook", what="the autograd context hook module",
        sources=(_build.HOOK_DIR / "autograd_context_hook.cpp",
                 _build.HOOK_DIR / "module_forward.cpp",
                 _build.HOOK_DIR / "tensor_marks.cpp"),
        headers=(_build.HOOK_DIR / "context_hook.h", _build.HOOK_DIR / "tensor_marks.h",
                 _build.HOOK_DIR / "key_set.h"),
        include_dirs=(sysconfig.get_paths()["include"],),
        libraries=("c10", "torch_cpu", "torch_python"), check=_check)


def load() -> ModuleType:
    """The extension, built if needed and imported once per process; a failure
    is remembered (raised again without rebuilding)."""
    return _build.load_module(_spec(), open_library=_import)


def _import(path: Path) -> ModuleType:
    loader = importlib.machinery.ExtensionFileLoader(_NAME, str(path))
    spec = importlib.util.spec_from_file_location(_NAME, str(path), loader=loader)
    if spec is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


class NativeHooks:
    """The extension's life in one process: ``start()`` builds and installs it on
    a background thread once, then calls ``ready(module)``; ``state_after`` says
    how it went. ``on_backward_start(task, ctx)`` is what the hooks call on a
    backward pass's first claimed node (they restore the context at its end
    themselves)."""

    def __init__(self, on_backward_start: Callable[[int, int], None],
                 ready: Callable[[Any], None]) -> None:
        self.on_backward_start = on_backward_start
        self.ready = ready
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._after_fork_in_child)

    def _reset(self) -> None:
        self.state = "not started"
        self._done = threading.Event()
        self._lock = threading.Lock()

    def _after_fork_in_child(self) -> None:
        # The parent's build thread does not exist here: a child forked
        # mid-build would wait for it forever. It builds (or finds the
        # parent's cached library) at its own first start.
        if self.state == "building":
            self._reset()
        else:
            self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self.state != "not started":
                return
            if os.environ.get("TORCHMEM_AUTOGRAD_HOOKS", "").lower() == "python":
                self.state = "python: TORCHMEM_AUTOGRAD_HOOKS=python"
                self._done.set()
                return
            self.state = "building"
        threading.Thread(target=self._build, name="torchmem-autograd-hooks",
                         daemon=True).start()

    def _build(self) -> None:
        from .. import _recorder

        try:
            native = load()
            native.install(*_recorder.context_fn_addresses(), self.on_backward_start)
            self.ready(native)
        except Exception as exc:  # noqa: BLE001 -- the Python hooks stay
            self.state = f"python: {exc}"
        else:
            self.state = "native"
        finally:
            self._done.set()

    def state_after(self, wait_s: float = 0.0) -> str:
        """How backward attribution claims autograd nodes: ``"native"`` (the C++
        node pre-hooks), ``"building"``, ``"not started"`` (no ContextSource
        started yet), or ``"python: REASON"`` (torch's Python node hooks: the
        same contexts at several µs more per module call); after waiting up to
        ``wait_s`` seconds for a build in progress."""
        if wait_s > 0 and self.state == "building":
            self._done.wait(wait_s)
        return self.state

    def build(self, wait_s: float = 0.0) -> str:
        """Starts building the C++ node hooks now rather than at the first
        ContextSource start (a container image, a test session); returns
        ``state_after(wait_s)``."""
        self.start()
        return self.state_after(wait_s)
