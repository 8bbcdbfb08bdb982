"""Exports of a profiler's trace: PyTorch memory_viz, Perfetto / Chrome trace, HTML report,
TensorBoard scalars.

Each ``export_*(profiler, path, progress=None)`` writes a file (mode 0600:
exports hold source paths; TensorBoard's is a directory of event files);
``to_*`` returns the object instead. ``profiler``
is a live ``MemoryProfiler`` or one from ``torchmem.load(path)``.
"""

from __future__ import annotations

import os
from typing import Any

from ._common import Progress, ProgressBar
from .html import export_html, to_html
from .memory_viz import export_memory_viz, to_memory_viz
from .perfetto import export_perfetto, to_perfetto
from .tensorboard import export_tensorboard

__all__ = [
    "FORMATS",
    "ProgressBar",
    "export",
    "export_html",
    "export_memory_viz",
    "export_perfetto",
    "export_tensorboard",
    "to_html",
    "to_memory_viz",
    "to_perfetto",
]

FORMATS = {"memory_viz": export_memory_viz, "perfetto": export_perfetto, "html": export_html,
           "tensorboard": export_tensorboard}


def export(profiler: Any, path: str | os.PathLike, format: str, progress: Progress = None) -> None:
    """Writes ``profiler``'s trace to ``path`` as ``format`` ("memory_viz", "perfetto", "html",
    "tensorboard")."""
    try:
        fn = FORMATS[format]
    except KeyError:
        raise ValueError(f"unknown export format {format!r}; choose one of "
                         f"{', '.join(FORMATS)}") from None
    fn(profiler, path, progress=progress)
