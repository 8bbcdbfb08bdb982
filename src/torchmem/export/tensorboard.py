"""Per-step memory scalars for TensorBoard, from a live or a loaded profiler.

``export_tensorboard(profiler, DIR)`` (``torchmem export TRACE --format
tensorboard -o DIR``) writes TensorBoard event files into ``DIR`` through
the ``tensorboard`` package's own event file writer (``pip install
torchmem[tensorboard]``), one event a step holding all of its scalars: no
torch import (the integrations' SummaryWriter costs about 190 MB to import
and 15x the time a scalar), the events read a window at a time and every
step's categories kept as arrays (``step_category_bytes``: 16 bytes per
category and step), so memory grows with the steps, not the events (154 MiB
peak for 10M events in 172K steps). One point per step and tag, at
``global_step`` = the step and the wall time of the step's last event:

- ``torchmem/current_bytes``: live bytes at the step's end;
- ``torchmem/peak_bytes``: the highest live bytes after any of the step's events;
- ``torchmem/current_bytes/TYPE.DEVICE`` and ``torchmem/peak_bytes/TYPE.DEVICE``
  for each allocation type and device (``CPU.host``, ``GPU.device0``);
- ``torchmem/category_bytes/CATEGORY``: what was live at the step's peak by
  category (parameter, activation, ...), where the profiler can say
  (``MemoryProfiler.breakdown``, attribution on);
- ``torchmem/gc_time_ns`` and ``torchmem/gc_count``: the garbage
  collections that ended in the step.

``step_scalars`` gives the same names and values as a dict; the framework
callbacks (torchmem.integrations) log them under these names too.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import numpy as np

from ..analysis.run_moments import step_category_bytes
from ..analysis.categories import CATEGORIES
from ..analysis.steps import StepMemory, step_memory
from ._common import Progress

__all__ = ["PREFIX", "export_tensorboard", "pair_label", "step_scalars", "summary_writer",
           "write_step"]

PREFIX = "torchmem"
_UNSAFE = re.compile(r"[^-\w.]")  # what TensorBoard would rewrite in a tag part


def pair_label(allocation_type: str, device: int) -> str:
    """``TYPE.DEVICE`` as used in tags: ``CPU.host``, ``GPU.device0``."""
    where = "host" if device < 0 else f"device{device}"
    return f"{_UNSAFE.sub('_', allocation_type)}.{where}"


def step_scalars(rec: StepMemory, categories: dict[str, int] | None = None, *,
                 by_type_device: bool = True, gc: bool = True,
                 prefix: str = PREFIX) -> dict[str, int]:
    """The scalars of one step: tag -> value (bytes, ns, counts); ``by_type_device``
    and ``gc`` leave those tags out when False."""
    out = {f"{prefix}/current_bytes": rec.current_bytes, f"{prefix}/peak_bytes": rec.peak_bytes}
    if by_type_device:
        for (t, d), v in rec.current_by_type_device.items():
            out[f"{prefix}/current_bytes/{pair_label(t, d)}"] = v
        for (t, d), v in rec.peak_by_type_device.items():
            out[f"{prefix}/peak_bytes/{pair_label(t, d)}"] = v
    for name, v in sorted((categories or {}).items()):
        out[f"{prefix}/category_bytes/{_UNSAFE.sub('_', str(name))}"] = int(v)
    if gc:
        out[f"{prefix}/gc_time_ns"] = rec.gc_time_ns
        out[f"{prefix}/gc_count"] = rec.gc_count
    return out


def write_step(writer: Any, rec: StepMemory, categories: dict[str, int] | None = None,
               prefix: str = PREFIX) -> None:
    """Adds one step's scalars to a SummaryWriter (global_step = the step)."""
    walltime = rec.last_timestamp_ns / 1e9 if rec.last_timestamp_ns else None
    for tag, value in step_scalars(rec, categories, prefix=prefix).items():
        writer.add_scalar(tag, value, global_step=rec.step, walltime=walltime)


def summary_writer(log_dir: str | os.PathLike | None) -> Any:
    """A torch.utils.tensorboard SummaryWriter on ``log_dir`` (None: its default,
    ``runs/DATE_HOST``); ImportError with the install line when tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:  # torch.utils.tensorboard needs the tensorboard package
        raise ImportError("the TensorBoard export needs the tensorboard package "
                          "(pip install torchmem[tensorboard])") from exc
    return SummaryWriter(log_dir=None if log_dir is None else os.fspath(log_dir))


def _event_writer(path: str | os.PathLike) -> tuple[Any, Any]:
    """(tensorboard's EventFileWriter on ``path``, a function making one step's event)."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter
    except ImportError as exc:
        raise ImportError("the TensorBoard export needs the tensorboard package "
                          "(pip install torchmem[tensorboard])") from exc

    def event(rec: StepMemory, categories: dict[str, int] | None) -> Any:
        values = [summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
                  for tag, v in step_scalars(rec, categories).items()]
        return event_pb2.Event(wall_time=rec.last_timestamp_ns / 1e9 if rec.last_timestamp_ns
                               else time.time(), step=rec.step,
                               summary=summary_pb2.Summary(value=values))

    os.makedirs(os.fspath(path), exist_ok=True)
    return EventFileWriter(os.fspath(path)), event


def export_tensorboard(profiler: Any, path: str | os.PathLike, progress: Progress = None) -> None:
    """Writes ``profiler``'s per-step scalars as TensorBoard event files in the directory ``path``."""
    profiler.flush()
    last = max(profiler.current_step, 1)
    writer, event = _event_writer(path)
    # Every step's breakdown in one pass (one breakdown per step re-read the run
    # each time), kept as arrays: a dict per step is ~0.5 KB, 90 MB at 170K steps.
    cat_steps = cat_bytes = None
    if getattr(profiler, "breakdown", None) is not None:
        cat_steps, cat_bytes, _ = step_category_bytes(profiler)
    try:
        for rec in step_memory(profiler):
            cats = None
            if cat_bytes is not None:
                j = int(np.searchsorted(cat_steps, rec.step))
                found = j < len(cat_steps) and cat_steps[j] == rec.step
                cats = {c: int(cat_bytes[i, j]) if found else 0
                        for i, c in enumerate(CATEGORIES)}
            writer.add_event(event(rec, cats))
            if progress is not None:
                progress(min(rec.step, last), last)
    finally:
        writer.close()
    if progress is not None:
        progress(last, last)
