"""Out-of-memory reports: what was live, where it came from, and what failed.

An out-of-memory error reaches torchmem in one of three ways:

- the CUDA plugin (or the history source's OOM observer, or
  ``profiler.record_oom`` in a test) records an OUT_OF_MEMORY event with
  the failed request and the device's free / total bytes;
- a ``torch.OutOfMemoryError`` (or a RuntimeError saying "out of memory")
  leaves an ``oom_guard()`` block or decorated function, or reaches
  ``sys.excepthook`` / ``threading.excepthook`` (installed by
  ``torchmem.enable()``);
- at exit, any OUT_OF_MEMORY event that no report covered yet (the program
  caught the error itself, e.g. a batch-size finder).

Each writes one report, as text and as self-contained HTML, into the trace
directory, and prints its path to stderr. What a report holds is
``torchmem.analysis.oom``; its text is ``torchmem.reports.oom``, its HTML
``torchmem.export.oom_html``. This module holds the public entry points,
which default to the session's profiler (``torchmem.enable()``) and never
start one.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

from . import _oom_hooks, _session
from ._deprecation import moved_names, warn_deprecated
from .analysis.oom import is_oom_error
from .reports import oom as _reports

__all__ = ["OomReport", "oom_guard", "is_oom_error", "write_report", "report_pending",
           "install", "uninstall"]

OomReport = _reports.OomReport


def _handle(exc: BaseException, profiler: Any = None) -> None:
    _oom_hooks.handle(exc, profiler if profiler is not None else _session.get_profiler())


def write_report(profiler: Any = None, error: BaseException | None = None, *,
                 oom: Any = None, directory: str | None = None,
                 window_s: float = 5.0, quiet: bool = False) -> OomReport:
    """Writes an OOM report (text and HTML) and prints its path to stderr.

    ``profiler`` defaults to the session's (RuntimeError when there is
    none); ``error`` is the exception (its message supplies the request
    size when no OOM event exists); ``oom`` is one of
    ``profiler.oom_events`` (default: the newest one not reported yet from
    the last 60 s). ``directory`` defaults to the trace directory;
    ``window_s``: seconds of timeline included.
    """
    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        raise RuntimeError("torchmem is not enabled and no profiler was given")
    return _reports.write_report(prof, error, oom=oom,
                                 directory=directory or _oom_hooks.installed_directory(),
                                 window_s=window_s, quiet=quiet)


def report_pending(profiler: Any, directory: str | None = None) -> list[OomReport]:
    """Reports every OUT_OF_MEMORY event of ``profiler`` no report covered yet (at exit)."""
    return _reports.report_pending(profiler, directory or _oom_hooks.installed_directory())


class oom_guard:
    """Writes an OOM report when an out-of-memory error leaves the block.

    As a context manager (``with torchmem.oom_guard(): train()``) or a
    decorator (``@torchmem.oom_guard()``). The error is re-raised unchanged,
    after the report is on disk. ``profiler`` defaults to the session's one
    at the time of the error.
    """

    def __init__(self, profiler: Any = None) -> None:
        self.profiler = profiler

    def __enter__(self) -> "oom_guard":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            _handle(exc, self.profiler)

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper


def install(*args: Any, directory: str | os.PathLike | None = None) -> None:
    """Hooks sys.excepthook and threading.excepthook to report uncaught OOMs of
    the session's profiler into ``directory``.

    ``install(profiler, directory)``, the old form, still works for one
    release (with a DeprecationWarning): the profiler was never used.
    """
    if args and (args[0] is None or not isinstance(args[0], (str, os.PathLike))):
        warn_deprecated("torchmem.oom.install(profiler, ...)", "torchmem.oom.install(directory)")
        args = args[1:]
    if len(args) > 1 or (args and directory is not None):
        raise TypeError("install() takes one directory")
    if args:
        directory = args[0]
    _oom_hooks.install(_session.get_profiler,
                       os.fspath(directory) if directory is not None else None)


uninstall = _oom_hooks.uninstall

__getattr__ = moved_names(__name__, {
    "build_report": "torchmem.analysis.oom:build_report",
    "render_text": "torchmem.reports.oom:render_text",
    "render_html": "torchmem.export.oom_html:render_html",
})
