"""Deprecated MemoryProfiler methods, kept for one release.

``MemoryProfiler.mark_epoch()`` and ``MemoryProfiler.find_gc_problems()``
were analysis inside the profiler, which made the profiler import the
layers above it. The analysis now lives in ``torchmem.analysis``; these
aliases are attached to the class from here (the session layer, which may
import everything below it), warn, and call the analysis.
"""

from __future__ import annotations

from typing import Any

from ._deprecation import warn_deprecated
from .analysis.gc_problems import find_gc_problems
from .epoch import mark_epoch
from .profiler import MemoryProfiler

__all__: list[str] = []


def _mark_epoch(self: MemoryProfiler) -> Any:
    """Deprecated: ``torchmem.mark_epoch(profiler)``."""
    warn_deprecated("MemoryProfiler.mark_epoch()", "torchmem.mark_epoch(profiler)")
    return mark_epoch(self)


def _find_gc_problems(self: MemoryProfiler, **thresholds: Any) -> list:
    """Deprecated: ``torchmem.analysis.gc_problems.find_gc_problems(profiler)``."""
    warn_deprecated("MemoryProfiler.find_gc_problems()",
                    "torchmem.analysis.gc_problems.find_gc_problems(profiler)")
    return find_gc_problems(self, **thresholds)


MemoryProfiler.mark_epoch = _mark_epoch
MemoryProfiler.find_gc_problems = _find_gc_problems
