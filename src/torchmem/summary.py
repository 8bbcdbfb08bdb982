"""The run summary's public entry point: ``format_summary()`` of the session's profiler.

``torchmem.enable()`` prints it at exit; ``torchmem summary TRACE`` prints
a saved trace's. The text is ``torchmem.reports.summary``; the sites it
lists are ``torchmem.analysis.summary``'s (``allocation_sites`` and
``growing_sites`` moved there in 0.2; they still work from here for one
release, with a DeprecationWarning).
"""

from __future__ import annotations

from typing import Any

from . import _session
from ._deprecation import moved_names
from .reports import summary as _text

__all__ = ["format_summary"]


def format_summary(profiler: Any = None, *, trace: str | None = None,
                   max_sites: int = 5) -> str:
    """The at-exit summary as text: peaks by type and device, top sites, leaks, trace path.

    ``profiler`` defaults to the session's ("torchmem: not enabled" without
    one: a query never enables torchmem); ``trace`` defaults to the
    session's trace file when it is the session's profiler.
    """
    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        return "torchmem: not enabled"
    if trace is None and prof is _session.get_profiler():
        trace = _session.trace_path()
    return _text.format_summary(prof, trace=trace, max_sites=max_sites)


__getattr__ = moved_names(__name__, {
    "allocation_sites": "torchmem.analysis.summary:allocation_sites",
    "growing_sites": "torchmem.analysis.summary:growing_sites",
})
