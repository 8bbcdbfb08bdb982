"""The "CUDA history" source: GPU allocations read from torch's own allocator.

Used when CUDA was initialised before ``torchmem.enable()`` (torch's allocator
can no longer be swapped for the plugin) or when the user asks for it. torch's
caching allocator keeps a trace of its actions once
``torch.cuda.memory._record_memory_history`` is on; this source reads the
trace from ``torch.cuda.memory._snapshot()["device_traces"]`` every
``interval_s`` seconds, at read time (:meth:`CudaHistorySource.poll`) and at
exit, and feeds each new entry to the profiler:

- ``alloc``          -> ``track_allocation(addr, size, "GPU", device, stream)``
- ``free_completed`` -> ``track_deallocation(addr, size)`` (the moment torch
  can reuse the block, which is also when its allocated-bytes counter drops)
- out of memory      -> ``profiler.record_oom(...)`` from torch's OOM observer
  (or the trace's ``oom`` entry when the observer cannot be attached).

Entries already read are skipped by a per-device cursor over the entries'
``time_us`` (or their position, for a torch without timestamps), so a trace
that keeps growing, or a ring that drops its oldest entries, is read once.
Blocks that were live when the source started are taken from the snapshot's
segments, so the counters start equal to torch's allocated bytes.

Costs and limits: torch builds a Python dict per trace entry at every
``_snapshot()``, so a poll costs in proportion to ``max_entries``; events get
the timestamp and step of the poll that read them (not of the allocation);
an entry that leaves torch's ring before a poll reads it is lost (counted in
``lost_entries``). The Python frames torch recorded are kept per live block
(:meth:`frames_for`).

Everything torch-specific is injected (``snapshot_fn``, ``record_history_fn``,
``attach_oom_fn``), so the logic runs on CPU against recorded snapshot dicts.
"""

from __future__ import annotations

import _thread
import atexit
import threading
import weakref
from typing import Any, Callable, Iterable

__all__ = ["CudaHistorySource", "TraceCursor"]

Frame = tuple[str, int, str]


class TraceCursor:
    """Which entries of one device's trace have been read.

    With timestamps, the cursor is the time of the last entry read and how
    many entries of the trace carry that same time (several can share a
    microsecond). Without them it is the number of entries read, reset when
    the trace gets shorter (history cleared).
    """

    def __init__(self) -> None:
        self.last_time_us: int | None = None
        self.count_at_last = 0
        self.position = 0
        self.lost_entries = 0

    def take(self, trace: list[dict[str, Any]], max_entries: int | None = None) -> list[dict[str, Any]]:
        """The entries of ``trace`` not returned before, oldest first."""
        if not trace:
            return []
        if "time_us" not in trace[0]:
            return self._take_positional(trace)
        last = self.last_time_us
        start = 0
        if last is not None:
            skip_same = self.count_at_last
            start = len(trace)
            for i, entry in enumerate(trace):
                t = entry["time_us"]
                if t < last:
                    continue
                if t == last and skip_same > 0:
                    skip_same -= 1
                    continue
                start = i
                break
            # A full ring whose oldest entry is already newer than the cursor
            # has dropped entries nobody read.
            if (max_entries is not None and len(trace) >= max_entries
                    and trace[0]["time_us"] > last):
                self.lost_entries += 1
        new = trace[start:]
        if new:
            self._advance(trace)
        return new

    def skip(self, trace: list[dict[str, Any]]) -> None:
        """Marks every entry of ``trace`` as read (the baseline at start)."""
        if trace and "time_us" in trace[0]:
            self._advance(trace)
        else:
            self.position = len(trace)

    def _advance(self, trace: list[dict[str, Any]]) -> None:
        last = trace[-1]["time_us"]
        count = 0
        for entry in reversed(trace):
            if entry["time_us"] != last:
                break
            count += 1
        self.last_time_us = last
        self.count_at_last = count

    def _take_positional(self, trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(trace) < self.position:  # history was cleared
            self.position = 0
        new = trace[self.position:]
        self.position = len(trace)
        return new


def _torch_snapshot() -> dict[str, Any]:
    import torch

    return torch.cuda.memory._snapshot()


def _torch_record_history(enabled: bool, max_entries: int, stacks: bool) -> None:
    import torch

    if enabled:
        torch.cuda.memory._record_memory_history(
            enabled="all", context="alloc" if stacks else None, stacks="python",
            max_entries=max_entries)
    else:
        torch.cuda.memory._record_memory_history(enabled=None)


# torch keeps OOM observers forever and has no way to detach one, so the
# process attaches a single observer that forwards to the live source.
_oom_target: "weakref.ref[CudaHistorySource] | None" = None
_oom_attached = False
_oom_lock = threading.Lock()


def _dispatch_oom(device: int, alloc: int, device_total: int, device_free: int) -> None:
    source = _oom_target() if _oom_target is not None else None
    if source is not None:
        source._on_oom(device, alloc, device_total, device_free)


def _torch_attach_oom(callback: Callable[[int, int, int, int], None]) -> None:
    import torch

    torch._C._cuda_attach_out_of_memory_observer(callback)


class CudaHistorySource:
    """Feeds torch's CUDA allocation history into ``profiler``.

    ``interval_s``: seconds between background polls (0: only explicit
    :meth:`poll` calls). ``max_entries``: size of torch's trace ring.
    ``stacks``: ask torch to record the Python frames of each allocation.
    """

    def __init__(
        self,
        profiler: Any,
        *,
        interval_s: float = 1.0,
        max_entries: int = 200_000,
        stacks: bool = False,
        snapshot_fn: Callable[[], dict[str, Any]] | None = None,
        record_history_fn: Callable[[bool, int, bool], None] | None = None,
        attach_oom_fn: Callable[[Callable[[int, int, int, int], None]], None] | None = None,
        current_stream_fn: Callable[[int], int] | None = None,
    ) -> None:
        self.profiler = profiler
        self.interval_s = float(interval_s)
        self.max_entries = int(max_entries)
        self.stacks = bool(stacks)
        self._snapshot = snapshot_fn or _torch_snapshot
        self._record_history = record_history_fn or _torch_record_history
        self._attach_oom = attach_oom_fn if attach_oom_fn is not None else _torch_attach_oom
        self._current_stream = current_stream_fn
        self._cursors: dict[int, TraceCursor] = {}
        self._live: dict[int, int] = {}  # address -> size, blocks this source recorded
        self._frames: dict[int, tuple[Frame, ...]] = {}
        self._lock = threading.Lock()  # one poll at a time
        self._cv = threading.Condition()
        self._wake = threading.Event()
        self._polls_started = 0
        self._polls_done = 0
        self._thread_ident: int | None = None
        self._thread_exited = threading.Event()
        self._thread_running = threading.Event()
        self._stopping = False
        self._started = False
        self._oom_via_observer = False
        self.errors = 0
        self.events_read = 0

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> "CudaHistorySource":
        """Turns torch's history on, records the blocks live now, starts polling."""
        global _oom_target, _oom_attached
        if self._started:
            return self
        self._record_history(True, self.max_entries, self.stacks)
        with self._lock:
            snap = self._snapshot()
            self._baseline(snap)
        with _oom_lock:
            try:
                if not _oom_attached:
                    self._attach_oom(_dispatch_oom)
                    _oom_attached = True
                _oom_target = weakref.ref(self)
                self._oom_via_observer = True
            except Exception:  # a torch without the observer: use the trace's oom entries
                self._oom_via_observer = False
        self._started = True
        if self.interval_s > 0:
            self._thread_exited.clear()
            self._thread_running.clear()
            # _thread, not threading: the poller's Python stack then holds only
            # torchmem frames, which stack capture skips, so the events it feeds
            # carry no bogus stack.
            _thread.start_new_thread(self._loop, ())
            self._thread_running.wait(5.0)  # so poll() hands reads to it from now on
        atexit.register(self.stop)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stops polling after a last read; turns torch's history off."""
        global _oom_target
        if not self._started:
            return
        self._started = False
        self._stopping = True
        self._wake.set()
        if self._thread_ident is not None:
            self._thread_exited.wait(timeout)
        try:
            self._poll_now()
        except Exception:
            self.errors += 1
        with _oom_lock:
            if _oom_target is not None and _oom_target() is self:
                _oom_target = None
        try:
            self._record_history(False, self.max_entries, self.stacks)
        except Exception:
            self.errors += 1
        try:
            atexit.unregister(self.stop)
        except Exception:
            pass

    # -- reading ------------------------------------------------------------------
    def poll(self, timeout: float = 10.0) -> int:
        """Reads the entries added since the last read; returns how many were fed.

        While the background poller runs, the read is done by it (so events
        never get the caller's stack) and this call waits for it.
        """
        ident = self._thread_ident
        if ident is None or ident == threading.get_ident() or self._stopping:
            return self._poll_now()
        with self._cv:
            target = self._polls_started + 1
            before = self.events_read
            self._wake.set()
            self._cv.wait_for(lambda: self._polls_done >= target or self._stopping, timeout)
            return self.events_read - before

    def frames_for(self, address: int) -> tuple[Frame, ...] | None:
        """The Python frames torch recorded for a live block (innermost first)."""
        return self._frames.get(int(address))

    @property
    def lost_entries(self) -> int:
        """Polls that found torch's ring had dropped entries not yet read."""
        return sum(c.lost_entries for c in self._cursors.values())

    @property
    def live_bytes(self) -> int:
        """Bytes of the live blocks this source has recorded."""
        return sum(self._live.values())

    # -- internals ----------------------------------------------------------------
    def _loop(self) -> None:
        self._thread_ident = threading.get_ident()
        self._thread_running.set()
        try:
            while not self._stopping:
                self._wake.wait(self.interval_s)
                self._wake.clear()
                if self._stopping:
                    break
                with self._cv:
                    self._polls_started += 1
                try:
                    self._poll_now()
                except Exception:
                    self.errors += 1
                finally:
                    with self._cv:
                        self._polls_done += 1
                        self._cv.notify_all()
        finally:
            self._thread_ident = None
            with self._cv:
                self._cv.notify_all()
            self._thread_exited.set()

    def _poll_now(self) -> int:
        with self._lock:
            snap = self._snapshot()
            n = 0
            for device, trace in enumerate(snap.get("device_traces") or []):
                cursor = self._cursors.setdefault(device, TraceCursor())
                n += self._feed(device, cursor.take(trace, self.max_entries))
            self.events_read += n
            return n

    def _baseline(self, snap: dict[str, Any]) -> None:
        for device, trace in enumerate(snap.get("device_traces") or []):
            self._cursors.setdefault(device, TraceCursor()).skip(trace)
        for segment in snap.get("segments") or []:
            device = int(segment.get("device", 0))
            stream = int(segment.get("stream", 0))
            for block in segment.get("blocks") or []:
                if block.get("state") != "active_allocated":
                    continue
                addr = int(block["address"])
                # The size asked for, as torch's trace records allocations (its
                # memory_allocated counts the rounded block size instead).
                size = int(block.get("requested_size", block["size"]))
                self._alloc(addr, size, device, stream, block.get("frames"))

    def _feed(self, device: int, entries: Iterable[dict[str, Any]]) -> int:
        n = 0
        for e in entries:
            action = e.get("action")
            if action == "alloc":
                self._alloc(int(e["addr"]), int(e["size"]), device, int(e.get("stream", 0)),
                            e.get("frames"))
                n += 1
            elif action == "free_completed":
                addr = int(e["addr"])
                if addr in self._live:
                    size = self._live.pop(addr)
                    self._frames.pop(addr, None)
                    self.profiler.track_deallocation(addr, size)
                    n += 1
            elif action == "oom" and not self._oom_via_observer:
                self._record_oom(device, int(e.get("size", 0)), int(e.get("stream", 0)),
                                 int(e.get("device_free", 0)), 0)
                n += 1
        return n

    def _alloc(self, addr: int, size: int, device: int, stream: int, frames: Any) -> None:
        if addr in self._live:  # a free this source never saw; close the old block
            self.profiler.track_deallocation(addr, self._live.pop(addr))
        self.profiler.track_allocation(addr, size, "GPU", device, stream)
        self._live[addr] = size
        if frames:
            self._frames[addr] = tuple(
                (str(f.get("filename", "?")), int(f.get("line", 0)), str(f.get("name", "?")))
                for f in frames)

    def _on_oom(self, device: int, alloc: int, device_total: int, device_free: int) -> None:
        stream = 0
        if self._current_stream is not None:
            try:
                stream = int(self._current_stream(device))
            except Exception:
                stream = 0
        else:
            try:
                import torch

                stream = int(torch.cuda.current_stream(device).cuda_stream)
            except Exception:
                stream = 0
        self._record_oom(device, alloc, stream, device_free, device_total)

    def _record_oom(self, device: int, requested: int, stream: int, device_free: int,
                    device_total: int) -> None:
        try:
            self.profiler.record_oom(requested, device, stream, device_free, device_total)
        except Exception:
            self.errors += 1
