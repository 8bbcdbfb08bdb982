"""Export to PyTorch's memory_viz snapshot format (the dict of torch.cuda.memory._snapshot()).

The pickle opens at https://pytorch.org/memory_viz (drag and drop) and is
read by ``torch.cuda._memory_viz`` (``trace``, ``segments``, ``memory``,
``segsum``, ``trace_plot``, ``segment_plot``).

Mapping:
- every CUDA device ``d`` is ``device_traces[d]``; host memory (device -1:
  "CPU", "Pinned", user types) goes to one pseudo device after the last
  CUDA device (``torchmem_devices`` in the dict names each index);
- an allocation or reallocation is an ``alloc`` entry, with its
  ``category`` (torchmem.analysis: parameter, buffer, gradient,
  optimizer_state, input, activation, temporary or other, as when it was
  made; memory_viz colours allocations by it); a free is a
  ``free_requested`` entry followed by ``free_completed`` (torchmem sees the
  free when the memory is released, so both carry the same time); an
  out-of-memory error is an ``oom`` entry; snapshot and GC markers are left out;
- ``time_us`` is wall-clock microseconds since the epoch; ``frames`` are the
  captured Python stack, innermost first (a free carries its allocation's);
- torchmem sees no allocator segments, so ``segments`` are synthesised: per
  device, the merged address ranges every allocation in the trace touched,
  holding the allocations live at the end as ``active_allocated`` blocks and
  the gaps as ``inactive`` ones. No ``segment_alloc`` entries are written.
"""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np

from ..analysis.timeline import allocation_categories
from ._common import ALLOC, FREE, OOM, REALLOC, Progress, all_events, chunks

__all__ = ["to_memory_viz", "export_memory_viz"]

_LARGE_SEGMENT = 1 << 20  # torch calls segments above 1 MiB "large"


class _Frames:
    """Frame lists per stack id, built once and shared (pickle stores them once)."""

    def __init__(self, profiler: Any) -> None:
        self.profiler = profiler
        self.cache: dict[int, list[dict[str, Any]]] = {0: []}

    def __call__(self, stack_id: int) -> list[dict[str, Any]]:
        frames = self.cache.get(stack_id)
        if frames is None:
            trace = self.profiler.resolve_stack(stack_id)
            frames = [{"filename": f, "line": line, "name": fn}
                      for f, line, fn in (trace.frames if trace else ())]
            self.cache[stack_id] = frames
        return frames


def _device_index(events: np.ndarray, live: np.ndarray) -> tuple[dict[int, int], dict[int, str]]:
    devices = set(np.unique(events["device"]).tolist()) | set(np.unique(live["device"]).tolist())
    cuda = sorted(d for d in devices if d >= 0)
    n_cuda = (max(cuda) + 1) if cuda else 0
    index = {d: d for d in range(n_cuda)}
    names = {d: f"cuda:{d}" for d in range(n_cuda)}
    if any(d < 0 for d in devices):
        for d in (d for d in devices if d < 0):
            index[d] = n_cuda  # every host type shares one pseudo device
        names[n_cuda] = "host"
    return index, names


def _segments(device: int, intervals: np.ndarray, live: list[tuple[int, int, int, int]],
              frames: _Frames) -> list[dict[str, Any]]:
    """Merged ranges of ``intervals`` ((start, end) rows) with ``live`` blocks in them."""
    if not len(intervals):
        return []
    order = np.argsort(intervals[:, 0], kind="stable")
    starts, ends = intervals[order, 0], intervals[order, 1]
    run_end = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > run_end[:-1]  # touching ranges merge, like allocator splits
    seg_starts = starts[new]
    seg_ends = np.append(run_end[np.flatnonzero(new)[1:] - 1], run_end[-1])
    live_sorted = sorted(live)
    segs, j = [], 0
    for s, e in zip(seg_starts.tolist(), seg_ends.tolist()):
        blocks, cursor, allocated, stream = [], s, 0, None
        while j < len(live_sorted) and live_sorted[j][0] < e:
            addr, size, stack_id, st = live_sorted[j]
            j += 1
            if addr < cursor:  # overlaps a block already placed: cannot be drawn
                continue
            if addr > cursor:
                blocks.append({"address": cursor, "size": addr - cursor,
                               "requested_size": 0, "state": "inactive", "frames": []})
            blocks.append({"address": addr, "size": size, "requested_size": size,
                           "state": "active_allocated", "frames": frames(stack_id)})
            stream = st if stream is None else stream
            allocated += size
            cursor = addr + size
        if cursor < e:
            blocks.append({"address": cursor, "size": e - cursor, "requested_size": 0,
                           "state": "inactive", "frames": []})
        total = e - s
        segs.append({
            "device": device, "address": s, "total_size": total, "allocated_size": allocated,
            "active_size": allocated, "requested_size": allocated, "stream": stream or 0,
            "segment_type": "large" if total > _LARGE_SEGMENT else "small",
            "segment_pool_id": (0, 0), "is_expandable": False, "frames": [], "blocks": blocks,
        })
    return segs


def to_memory_viz(profiler: Any, progress: Progress = None) -> dict[str, Any]:
    """The profiler's trace as a ``torch.cuda.memory._snapshot()`` dict (see module doc)."""
    events = all_events(profiler)
    live = profiler.live_allocations()
    index, names = _device_index(events, live)
    n_dev = max(index.values(), default=-1) + 1
    traces: list[list[dict[str, Any]]] = [[] for _ in range(n_dev)]
    frames = _Frames(profiler)
    ooms = profiler.oom_events
    categories = allocation_categories(profiler)
    cols = [events[c].tolist() for c in
            ("kind", "address", "size", "stream", "timestamp_ns", "stack_id", "device", "seq")]
    for start, stop in chunks(len(events), progress):
        for kind, addr, size, stream, ts, stack, dev, seq in zip(*(c[start:stop] for c in cols)):
            t = traces[index[dev]] if dev in index else None
            if t is None:
                continue
            time_us = ts // 1000
            if kind == ALLOC or kind == REALLOC:
                t.append({"action": "alloc", "addr": addr, "size": size, "stream": stream,
                          "time_us": time_us, "frames": frames(stack),
                          "category": categories.get(seq, "other")})
            elif kind == FREE:
                f = frames(stack)
                for action in ("free_requested", "free_completed"):
                    t.append({"action": action, "addr": addr, "size": size, "stream": stream,
                              "time_us": time_us, "frames": f})
            elif kind == OOM:
                info = ooms[addr] if addr < len(ooms) else None
                t.append({"action": "oom", "size": size, "stream": stream, "time_us": time_us,
                          "device_free": info.device_free_bytes if info else 0,
                          "frames": frames(stack)})
    # Every address any event touched must lie in a segment: memory_viz's
    # segment view replays the trace backwards over them.
    used = events[np.isin(events["kind"], (ALLOC, REALLOC, FREE))]
    segments: list[dict[str, Any]] = []
    for dev in sorted(set(index.values())):
        devs = [d for d, i in index.items() if i == dev]
        ev = used[np.isin(used["device"], devs)]
        lv = live[np.isin(live["device"], devs)]
        starts = np.concatenate([ev["address"], lv["address"]]).astype(np.uint64)
        sizes = np.concatenate([ev["size"], lv["size"]]).astype(np.uint64)
        intervals = np.stack([starts, starts + np.maximum(sizes, 1)], axis=1)
        blocks = list(zip(lv["address"].tolist(), lv["size"].tolist(), lv["stack_id"].tolist(),
                          lv["stream"].tolist()))
        segments.extend(_segments(dev, intervals, blocks, frames))
    return {"segments": segments, "device_traces": traces, "torchmem_devices": names}


def export_memory_viz(profiler: Any, path: str | os.PathLike, progress: Progress = None) -> None:
    """Writes ``to_memory_viz(profiler)`` as a pickle to ``path`` (mode 0600: it holds source paths)."""
    data = to_memory_viz(profiler, progress)
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        pickle.dump(data, f, protocol=4)
