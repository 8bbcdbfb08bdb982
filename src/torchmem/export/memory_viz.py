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

``export_memory_viz`` streams, reading the events twice a batch at a time:
first for each allocation's category when made (analysis.windows: known once
it is freed; one byte per event is kept), then it pickles each batch of a
device's entries on its own into a temporary file
(``_Spool``) and merges the address ranges as it goes, then writes the
snapshot's pickle around those pieces. Pickle protocol 2 names every memo
slot explicitly, so pieces pickled apart (each refers only to its own
slots) join into one pickle; only the opcodes of plain lists, dicts, ints
and strings are used, which memory_viz's own unpickler reads. Memory is a
batch, the allocations live across it, the merged ranges and a byte per
event; the file unpickles
to what ``to_memory_viz`` returns.
"""

from __future__ import annotations

import os
import pickle
import shutil
import tempfile
from typing import IO, Any, Iterator

import numpy as np

from ..analysis.categories import CATEGORIES
from ..analysis.windows import NOT_AN_ALLOCATION, creation_categories
from ._common import ALLOC, FREE, OOM, REALLOC, Progress

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


def _segments(device: int, intervals: np.ndarray, live: list[tuple[int, int, int, int]],
              frames: _Frames) -> list[dict[str, Any]]:
    """Merged ranges of ``intervals`` ((start, end) rows) with ``live`` blocks in them."""
    if not len(intervals):
        return []
    merged = _merge(intervals)
    seg_starts, seg_ends = merged[:, 0], merged[:, 1]
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


def _merge(intervals: np.ndarray) -> np.ndarray:
    """Merged (start, end) rows of ``intervals``: touching ranges merge, like
    allocator splits (merging is associative, so batches merge as they come)."""
    if not len(intervals):
        return intervals
    order = np.argsort(intervals[:, 0], kind="stable")
    starts, ends = intervals[order, 0], intervals[order, 1]
    run_end = np.maximum.accumulate(ends)
    new = np.ones(len(starts), dtype=bool)
    new[1:] = starts[1:] > run_end[:-1]
    seg_ends = np.append(run_end[np.flatnonzero(new)[1:] - 1], run_end[-1])
    return np.stack([starts[new], seg_ends], axis=1)


_NAMES = list(CATEGORIES) + ["other"] * (NOT_AN_ALLOCATION + 1 - len(CATEGORIES))


def _entries(rows: np.ndarray, frames: _Frames, ooms: list,
             categories: np.ndarray) -> Iterator[dict[str, Any]]:
    cols = [rows[c].tolist() for c in
            ("kind", "address", "size", "stream", "timestamp_ns", "stack_id")]
    seqs = rows["seq"].astype(np.int64)
    codes = np.full(len(rows), NOT_AN_ALLOCATION, np.uint8)
    held = seqs < len(categories)
    codes[held] = categories[seqs[held]]
    cols.append(codes.tolist())
    for kind, addr, size, stream, ts, stack, code in zip(*cols):
        time_us = ts // 1000
        if kind == ALLOC or kind == REALLOC:
            yield {"action": "alloc", "addr": addr, "size": size, "stream": stream,
                   "time_us": time_us, "frames": frames(stack),
                   "category": _NAMES[code]}
        elif kind == FREE:
            f = frames(stack)
            for action in ("free_requested", "free_completed"):
                yield {"action": action, "addr": addr, "size": size, "stream": stream,
                       "time_us": time_us, "frames": f}
        elif kind == OOM:
            info = ooms[addr] if addr < len(ooms) else None
            yield {"action": "oom", "size": size, "stream": stream, "time_us": time_us,
                   "device_free": info.device_free_bytes if info else 0,
                   "frames": frames(stack)}


_BATCH = 1 << 13  # entries pickled together (one memo, one piece)
_LIST_HEAD = b"\x80\x02]q\x00"  # protocol 2: EMPTY_LIST, BINPUT 0


def _piece(obj: Any) -> bytes:
    """``obj``'s pickle opcodes without the protocol header and STOP."""
    data = pickle.dumps(obj, protocol=2)
    return data[2:-1]


def _items_piece(entries: list[dict[str, Any]]) -> bytes:
    """Opcodes that append ``entries`` to the list on top of the unpickler's
    stack: a pickled list without its EMPTY_LIST and slot 0 (never referred
    to again: nothing holds the list)."""
    data = pickle.dumps(entries, protocol=2)
    assert data.startswith(_LIST_HEAD) and data.endswith(b".")
    return data[len(_LIST_HEAD):-1]


class _Spool:
    """One device's entries as pickle pieces in a temporary file."""

    def __init__(self) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile()

    def add(self, entries: list[dict[str, Any]]) -> None:
        for start in range(0, len(entries), _BATCH):
            self.file.write(_items_piece(entries[start:start + _BATCH]))

    def copy_to(self, out: IO[bytes]) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)


def _snapshot(profiler: Any, progress: Progress, streamed: bool,
              spools: dict[int, _Spool]) -> dict[str, Any]:
    """The snapshot dict; with ``streamed`` each of its device traces is the
    list of ``spools`` (one per device, filled here) that hold its entries,
    else the entries themselves."""
    profiler.flush()
    frames = _Frames(profiler)
    ooms = profiler.oom_events
    # A first read of the events, a window at a time: each allocation's
    # category when made is known only once it is freed (one byte per event).
    categories = creation_categories(profiler)
    ranges: dict[int, np.ndarray] = {}
    devices: set[int] = set()
    lists: dict[int, list[dict[str, Any]]] = {}
    n_total, done = max(int(profiler.next_seq), 1), 0
    for rows in profiler.iter_event_rows():
        for dev in np.unique(rows["device"]).tolist():
            devices.add(dev)
            mine = rows[rows["device"] == dev]
            entries = list(_entries(mine, frames, ooms, categories))
            if streamed:
                spools.setdefault(dev, _Spool()).add(entries)
            else:
                lists.setdefault(dev, []).extend(entries)
            # Every address any event touched must lie in a segment: memory_viz's
            # segment view replays the trace backwards over them.
            used = mine[np.isin(mine["kind"], (ALLOC, REALLOC, FREE))]
            if len(used):
                starts = used["address"].astype(np.uint64)
                iv = np.stack([starts, starts + np.maximum(used["size"].astype(np.uint64), 1)],
                              axis=1)
                ranges[dev] = _merge(np.concatenate([ranges[dev], iv]) if dev in ranges else iv)
        done += len(rows)
        if progress is not None:
            progress(min(done, n_total), n_total)
    if progress is not None and not done:
        progress(0, 0)
    # After the events: for a loaded trace, reading them was also its pass.
    live = profiler.live_allocations()
    devices |= set(np.unique(live["device"]).tolist())
    cuda = sorted(d for d in devices if d >= 0)
    n_cuda = (max(cuda) + 1) if cuda else 0
    index = {d: d for d in range(n_cuda)}
    names = {d: f"cuda:{d}" for d in range(n_cuda)}
    if any(d < 0 for d in devices):
        for d in (d for d in devices if d < 0):
            index[d] = n_cuda  # every host type shares one pseudo device
        names[n_cuda] = "host"
    n_dev = max(index.values(), default=-1) + 1
    traces: list[Any] = []
    for i in range(n_dev):
        devs = sorted(d for d, j in index.items() if j == i)
        if streamed:  # the spools of the devices in this trace, in order
            traces.append([spools[d] for d in devs if d in spools])
        else:
            traces.append([e for d in devs for e in lists.get(d, [])])
    segments: list[dict[str, Any]] = []
    for dev in sorted(set(index.values())):
        devs = [d for d, i in index.items() if i == dev]
        lv = live[np.isin(live["device"], devs)]
        starts = lv["address"].astype(np.uint64)
        parts = [ranges[d] for d in devs if d in ranges]
        parts.append(np.stack([starts, starts + np.maximum(lv["size"].astype(np.uint64), 1)],
                              axis=1))
        blocks = list(zip(lv["address"].tolist(), lv["size"].tolist(), lv["stack_id"].tolist(),
                          lv["stream"].tolist()))
        segments.extend(_segments(dev, np.concatenate(parts), blocks, frames))
    return {"segments": segments, "device_traces": traces, "torchmem_devices": names}


def to_memory_viz(profiler: Any, progress: Progress = None) -> dict[str, Any]:
    """The profiler's trace as a ``torch.cuda.memory._snapshot()`` dict (see
    module doc); in memory, unlike ``export_memory_viz``."""
    return _snapshot(profiler, progress, streamed=False, spools={})


def export_memory_viz(profiler: Any, path: str | os.PathLike, progress: Progress = None) -> None:
    """Writes the snapshot dict as a pickle to ``path`` (mode 0600: it holds
    source paths), streaming (see the module doc)."""
    spools: dict[int, _Spool] = {}
    try:
        data = _snapshot(profiler, progress, streamed=True, spools=spools)
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            # PROTO 2, EMPTY_DICT, MARK, then key, value pairs and SETITEMS, STOP.
            f.write(b"\x80\x02}(")
            f.write(_piece("segments") + _piece(data["segments"]))
            f.write(_piece("device_traces") + b"](")  # the list of traces, MARK
            for trace in data["device_traces"]:
                f.write(b"]")  # this device's list; its pieces append to it
                for spool in trace:
                    spool.copy_to(f)
            f.write(b"e")  # APPENDS: every device's list into the list of traces
            f.write(_piece("torchmem_devices") + _piece(data["torchmem_devices"]))
            f.write(b"u.")  # SETITEMS, STOP
    finally:
        for spool in spools.values():
            spool.file.close()
