"""The process-wide out-of-memory hooks: sys.excepthook and threading.excepthook.

``torchmem.enable()`` installs them (``oom_report=True``) so that an
out-of-memory error nobody catches still leaves a report. They are global
state, owned by the session; the profiler they report on is whatever
``get_profiler()`` (given at install) returns when the error arrives.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Callable

from .analysis.oom import is_oom_error
from .reports.oom import default_directory, write_report

__all__ = ["handle", "install", "installed_directory", "uninstall"]

_lock = threading.RLock()
_hook: dict[str, Any] = {}  # what install() replaced, and where reports go


def installed_directory() -> str:
    """Where reports go: the directory given to install(), else the default."""
    return _hook.get("directory") or default_directory()


def handle(exc: BaseException, profiler: Any) -> None:
    """Writes a report of ``profiler`` when ``exc`` is an out-of-memory error
    that has none yet; never raises (the user's error must stay the error)."""
    if getattr(exc, "_torchmem_report", None) or not is_oom_error(exc):
        return
    try:
        if profiler is None:
            raise RuntimeError("torchmem is not enabled and no profiler was given")
        write_report(profiler, exc, directory=installed_directory())
    except Exception as err:  # a report must never replace the user's error
        print(f"torchmem: could not write the OOM report: {err!r}", file=sys.stderr)


def install(get_profiler: Callable[[], Any], directory: str | None = None) -> None:
    """Hooks sys.excepthook and threading.excepthook to report uncaught OOMs
    of ``get_profiler()`` into ``directory``."""
    with _lock:
        _hook["directory"] = directory
        _hook["get_profiler"] = get_profiler
        if "sys" in _hook:
            return
        prev_sys, prev_thread = sys.excepthook, threading.excepthook

        def sys_hook(tp: Any, exc: BaseException, tb: Any) -> None:
            handle(exc, _hook.get("get_profiler", lambda: None)())
            prev_sys(tp, exc, tb)

        def thread_hook(args: Any) -> None:
            if args.exc_value is not None:
                handle(args.exc_value, _hook.get("get_profiler", lambda: None)())
            prev_thread(args)

        _hook.update(sys=(prev_sys, sys_hook), thread=(prev_thread, thread_hook))
        sys.excepthook = sys_hook
        threading.excepthook = thread_hook


def uninstall() -> None:
    """Undoes install() (where nobody replaced the hooks since)."""
    with _lock:
        if "sys" in _hook:
            prev, ours = _hook.pop("sys")
            if sys.excepthook is ours:
                sys.excepthook = prev
        if "thread" in _hook:
            prev, ours = _hook.pop("thread")
            if threading.excepthook is ours:
                threading.excepthook = prev
        _hook.pop("directory", None)
        _hook.pop("get_profiler", None)
