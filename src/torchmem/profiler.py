"""MemoryProfiler: the one object that reads the recorder and answers questions.

Over 400 lines on purpose: this is the only module that calls the native
recorder's private methods on a recorder (``tests/test_layers.py`` checks
it), so every read of the recorder lives here, behind the public read API the
rest of torchmem uses (``read_rows``, ``live_allocations``, ``counters``,
``counters_by_type_and_device``, ``type_names``, ``resolve_stack``, the seq
bounds, the sink hand-over, and the replay of a saved trace). What does not
touch the recorder lives elsewhere: value types in ``_types``, side-record
checks and marker renumbering in ``_records``, layouts in ``_events``, stacks
in ``_stacks``, GC records and snapshots as held and read back in
``_held_records``, the sink thread in ``_pump``, the snapshot timer in
``_snapshots``, and ``SavedTraceProfiler`` (a loaded trace whose events stay
in the file) in ``_saved_trace``.

The profiler imports nothing above it (sources, analysis, sinks, the
session): NVML's device totals reach ``track_snapshot`` through
``MemoryProfiler.device_query``, which the session sets, and sources that
read in batches register with ``add_batch_source``.
"""

from __future__ import annotations

import datetime
import threading
import time
import warnings
from typing import Any, Callable, ClassVar, Iterator

import numpy as np

from . import _recorder
from ._checks import (
    check_bool,
    check_device,
    check_interval_ms,
    check_nonneg_int,
    check_seconds,
    check_stack_depth,
    epoch_ns,
)
from ._events import (
    check_event_rows,
    EventList,
    LIVE_DTYPE,
    STACK_NODE_DTYPE,
    TYPE_NONE,
    empty_events,
    events_from_bytes,
    allocating,
    allocation_sums,
    to_memory_events,
)
from ._contexts import MARK_INDEX, LiveContexts, MarkLog, SavedContexts
from ._held_records import HeldRecords
from ._records import (
    SIDE_RECORD_KINDS,
    anomaly_example_ok,
    gc_record_ok,
    keep_records,
    oom_ok,
    oom_or_none,
    snapshot_ok,
)
from ._snapshots import AutoSnapshotter
from ._stacks import LiveStacks, SavedStacks
from .trace import TraceDelta, marker_details
from ._types import (
    AnomalyReport,
    Counters,
    GCRecord,
    Leak,
    MemoryEvent,
    MemoryEventType,
    MemoryStatistics,
    OomEvent,
    Snapshot,
    StackTrace,
)

_NO_END = 2**64 - 1
#: The native recorder's "every device" (device -1 is the host).
_ALL_DEVICES = -2
_NO_COUNTERS = Counters()
#: Which native sources read the stack settings from native globals.
NATIVE_SOURCES = ("gpu", "cpu")


def _check_nonneg_int(value: Any, name: str) -> int:
    return check_nonneg_int(value, name)


class MemoryProfiler(_recorder.Recorder):
    """Records allocations and frees and answers questions about them.

    ``track_allocation(address, size_bytes, allocation_type="CPU", device=-1,
    stream=0)``, ``track_deallocation(address, size_bytes=None)`` and
    ``track_reallocation(old_address, new_address, new_size_bytes)`` are
    native methods: thread safe, about 100 ns a call, and they never raise
    on an unknown address, a double free or a size mismatch (those are
    counted in ``anomalies``); only a bad argument (wrong type, negative
    value) raises TypeError / ValueError.

    Args:
        storage: a StorageBackend that receives every event (durable traces,
            and queries older than the in-memory retention).
        publisher: an EventPublisher that delivers every event to subscribers.
        retention_events: events kept in memory (at least; older ones leave
            the ring once every sink has them).
        capture_stack_traces: record the Python stack of each allocation.
        max_stack_trace_depth: frames kept per stack (innermost first).
        snapshot_interval_ms: period of automatic snapshots.
        auto_snapshot: take snapshots every ``snapshot_interval_ms`` while enabled.
        flush_interval_ms: how often sinks are handed new events.
    """

    #: Called by ``track_snapshot`` for device totals (a list of per-device
    #: records, or a string saying why there are none). The session sets it
    #: to NVML's ``query_devices``; None means "not queried".
    device_query: ClassVar[Callable[[], Any] | None] = None
    #: The module behind breakdown(), peak_report() and step_peaks():
    #: torchmem.analysis.breakdown sets it when imported (``import torchmem``
    #: does), since the profiler imports nothing above it.
    queries: ClassVar[Any] = None
    #: True for a loaded trace: no event is added, and allocation_totals_by_stack
    #: covers every event iter_event_rows gives (a reader need not sum them).
    events_are_final: ClassVar[bool] = False
    #: With a storage that reads side records back (``read_side_records``:
    #: SQLiteStorage, InMemoryStorage), the GC records and snapshots kept in
    #: memory once stored: the latest this many of each (~250 and ~600
    #: bytes each); older ones are read back from the storage when asked.
    side_records_held: ClassVar[int] = 256
    #: The same for attribution marks (19 bytes each; ~5 a step on a small
    #: MLP), plus those on allocations still live (``live_attribution_marks``).
    marks_held: ClassVar[int] = 8192

    def __init__(
        self,
        storage: Any = None,
        publisher: Any = None,
        *,
        retention_events: int = 1 << 20,
        capture_stack_traces: bool = False,
        max_stack_trace_depth: int = 10,
        snapshot_interval_ms: int = 1000,
        auto_snapshot: bool = True,
        flush_interval_ms: int = 200,
    ) -> None:
        super().__init__(_check_nonneg_int(retention_events, "retention_events"))
        flush_interval_ms = check_interval_ms(flush_interval_ms, "flush_interval_ms")
        self._lock = threading.RLock()
        self._stacks: LiveStacks | SavedStacks = LiveStacks()
        self._contexts: LiveContexts | SavedContexts = LiveContexts()
        self._marks = MarkLog()
        # GC records and snapshots; the oldest leave memory once stored
        # (release_stored).
        self._gc = HeldRecords("gc")
        self._gc_open: dict[int, tuple[int, int, int]] = {}
        self._gc_count_by_generation: dict[int, int] = {}
        self._gc_total_ns = 0
        self._snaps = HeldRecords("snapshots")
        self._saved_ooms: list[OomEvent] | None = None  # a loaded trace's
        # A loaded trace's anomalies (counts, examples): bad input the live
        # recorder counted leaves no event, so a replay cannot count it again.
        self._saved_anomalies: tuple[dict[str, int], list[dict[str, Any]]] | None = None
        #: A loaded trace's malformed side records that were skipped, by kind
        #: ("snapshots", "GC records", ...): what ``from_trace`` warned about.
        self.skipped_side_records: dict[str, int] = {}
        # A loaded trace's: see _records.keep_records.
        self._side_maps: dict[str, list[int]] = {}
        self._native_sources: set[str] = set()  # see attach_native_source
        self._batch_sources: list[Callable[[], Any]] = []
        self.storage = storage
        self.publisher = publisher
        self.max_stack_trace_depth = max_stack_trace_depth
        self.capture_stack_traces = capture_stack_traces
        self._snapshot_interval_ms = 1000
        self.snapshot_interval_ms = snapshot_interval_ms
        self._auto_snapshot = check_bool(auto_snapshot, "auto_snapshot")
        self._snapshotter = None
        self._pump = None
        if storage is not None or publisher is not None:
            from ._pump import SinkPump

            self._pump = SinkPump(self, storage, publisher, flush_interval_ms)
            self._pump.start()
        self._sync_snapshotter()

    # -- settings ----------------------------------------------------------
    @property
    def is_enabled(self) -> bool:
        """Whether track_* calls are recorded."""
        return self.enabled

    def enable(self) -> None:
        """Start (or resume) recording."""
        self.enabled = True
        self._sync_snapshotter()

    def disable(self) -> None:
        """Stop recording; track_* calls are then ignored at almost no cost."""
        self.enabled = False
        self._sync_snapshotter()

    @property
    def capture_stack_traces(self) -> bool:
        """Record the Python stack of each allocation (costs < 1 us each)."""
        return self._capture_stacks

    @capture_stack_traces.setter
    def capture_stack_traces(self, on: bool) -> None:
        self._capture_stacks = check_bool(on, "capture_stack_traces")
        self._sync_hook_settings()

    @property
    def max_stack_trace_depth(self) -> int:
        """Frames kept per captured stack, innermost first."""
        return self._max_depth

    @max_stack_trace_depth.setter
    def max_stack_trace_depth(self, depth: int) -> None:
        self._max_depth = check_stack_depth(depth)
        self._sync_hook_settings()

    @property
    def snapshot_interval_ms(self) -> int:
        """Period of automatic snapshots, in milliseconds."""
        return self._snapshot_interval_ms

    @snapshot_interval_ms.setter
    def snapshot_interval_ms(self, ms: int) -> None:
        ms = check_interval_ms(ms, "snapshot_interval_ms")
        self._snapshot_interval_ms = ms
        if getattr(self, "_snapshotter", None) is not None:
            self._snapshotter.interval_ms = ms

    @property
    def auto_snapshot(self) -> bool:
        """Take a snapshot every ``snapshot_interval_ms`` while enabled."""
        return self._auto_snapshot

    @auto_snapshot.setter
    def auto_snapshot(self, on: bool) -> None:
        self._auto_snapshot = check_bool(on, "auto_snapshot")
        self._sync_snapshotter()

    def _sync_snapshotter(self) -> None:
        want = self._auto_snapshot and self.enabled
        to_stop = None
        with self._lock:
            if want and self._snapshotter is None:
                self._snapshotter = AutoSnapshotter(self, self._snapshot_interval_ms)
                self._snapshotter.start()
            elif not want and self._snapshotter is not None:
                to_stop, self._snapshotter = self._snapshotter, None
        # Joined outside the lock: a snapshot in progress takes self._lock.
        if to_stop is not None:
            to_stop.stop()

    def _sync_hook_settings(self) -> None:
        # The CUDA plugin and the CPU allocator hook have no profiler object
        # in hand; they read these.
        if self._native_sources:
            _recorder.set_stack_capture(self._capture_stacks, self._max_depth)

    def attach_native_source(self, kind: str) -> None:
        """Says that a native source (``"gpu"``: the CUDA plugin, ``"cpu"``: the
        CPU allocator hook) records into this profiler: such sources read the
        stack settings from native globals, which this profiler then keeps
        in step with ``capture_stack_traces`` / ``max_stack_trace_depth``."""
        if kind not in NATIVE_SOURCES:
            raise ValueError(f"kind must be one of {NATIVE_SOURCES}, got {kind!r}")
        self._native_sources.add(kind)
        self._sync_hook_settings()

    # -- sources that read in batches ------------------------------------------
    def add_batch_source(self, poll: Callable[[], Any]) -> None:
        """Registers ``poll()``, which brings a batch-reading source (torch's CUDA
        allocation history) up to date; ``poll_sources`` calls it."""
        with self._lock:
            if poll not in self._batch_sources:
                self._batch_sources.append(poll)

    def remove_batch_source(self, poll: Callable[[], Any]) -> None:
        """Undoes ``add_batch_source`` (no error when it was not registered)."""
        with self._lock:
            if poll in self._batch_sources:
                self._batch_sources.remove(poll)

    def poll_sources(self) -> None:
        """Brings every batch-reading source up to date (before a report reads
        the events); a source that fails is skipped, never raised."""
        with self._lock:
            polls = list(self._batch_sources)
        for poll in polls:
            try:
                poll()
            except Exception:
                pass

    # -- steps -----------------------------------------------------------------
    @property
    def current_step(self) -> int:
        """The training step events are stamped with (starts at 0)."""
        return self._get_step()

    def step(self) -> int:
        """Ends the current training step; returns the new step number."""
        return self._advance_step()

    # -- snapshots, GC -----------------------------------------------------
    def track_snapshot(self) -> Snapshot:
        """Records a SNAPSHOT event with the counters and NVML device totals
        (``device_query``; ``devices`` is None when none is set)."""
        query = type(self).device_query
        try:
            devices = query() if query is not None else None
        except Exception as exc:  # NVML must never break a training run
            devices = f"unavailable: {exc}"
        stats = self.get_statistics()
        with self._lock:
            snap = Snapshot(
                timestamp_ns=time.time_ns(),
                step=self.current_step,
                current_usage_bytes=stats.current_usage_bytes,
                peak_usage_bytes=stats.peak_usage_bytes,
                usage_by_type=stats.usage_by_type,
                usage_by_device=stats.usage_by_device,
                devices=devices,
            )
            index = self._snaps.append(snap)
            self._record_marker(int(MemoryEventType.SNAPSHOT), index, stats.current_usage_bytes)
        return snap

    @property
    def snapshots(self) -> list[Snapshot]:
        """Every snapshot taken, oldest first (those that left memory read back
        from the storage)."""
        return self._side_list(self._snaps)

    def record_gc_start(self, generation: int) -> None:
        """GC monitor hook: a collection of ``generation`` starts now."""
        with self._lock:
            index = self._gc.next_index + len(self._gc_open)
            freed = self._counters()[1]
            self._gc_open[generation] = (time.time_ns(), freed, index)
            self._record_marker(int(MemoryEventType.GC_START), index, 0)

    def record_gc_end(self, generation: int, collected: int, uncollectable: int) -> GCRecord:
        """GC monitor hook: the collection of ``generation`` ended now."""
        with self._lock:
            end = time.time_ns()
            start, freed_before, _index = self._gc_open.pop(generation, (end, None, 0))
            freed = self._counters()[1]
            tensor_bytes = freed - freed_before if freed_before is not None else 0
            record = GCRecord(generation, start, end, end - start, collected, uncollectable,
                              tensor_bytes, self.current_step)
            index = self._gc.append(record)
            self._gc_count_by_generation[generation] = (
                self._gc_count_by_generation.get(generation, 0) + 1)
            self._gc_total_ns += record.duration_ns
            self._record_marker(int(MemoryEventType.GC_END), index, tensor_bytes)
        return record

    @property
    def gc_records(self) -> list[GCRecord]:
        """Every garbage collection seen, oldest first (those that left memory
        read back from the storage)."""
        return self._side_list(self._gc)

    # -- side records that left memory (release_stored) ----------------------------
    def _side_list(self, records: HeldRecords) -> list[Any]:
        with self._lock:
            first, held = records.first, list(records.items)
        # Read outside the lock: GC callbacks and snapshots take it.
        return records.read_older(self.storage, first) + held

    def release_stored(self, cursors: dict[str, int]) -> None:
        """The storage has the side records before ``cursors`` (a sink's, as
        ``sink_delta`` moved them): all but the latest ``side_records_held`` GC
        records and snapshots and ``marks_held`` marks leave memory, read back
        from the storage when asked (the pump calls it; only with a storage
        that has ``read_side_records``). Marks on allocations live now stay
        too (``live_attribution_marks``)."""
        if self.storage is None or getattr(type(self.storage), "read_side_records",
                                           None) is None:
            return
        keep = self.side_records_held
        with self._lock:
            self._gc.release(cursors.get("gc", 0), keep)
            self._snaps.release(cursors.get("snapshots", 0), keep)
            dropped = self._marks.release(cursors.get("marks", 0), self.marks_held)
            kept = self._marks.kept
            if len(dropped) or len(kept):  # kept ones whose allocation was freed go too
                self._marks.kept = self._on_live(
                    np.concatenate([kept, dropped]) if len(dropped) else kept)

    _BACKWARD_START = MARK_INDEX["backward_start"]

    def _on_live(self, marks: np.ndarray) -> np.ndarray:
        """The marks (not backward starts) made on an allocation that is still live:
        the allocation live at the address now was made before the mark."""
        marks = marks[marks["category"] != self._BACKWARD_START]
        if not len(marks):
            return marks
        found = self._live_seqs(marks["address"].tolist())
        alloc_seq = np.fromiter((q for q, _ in found), np.uint64, len(found))
        return np.ascontiguousarray(marks[alloc_seq < marks["seq"]])

    def record_oom(self, requested_bytes: int, device: int, stream: int = 0,
                   device_free_bytes: int = 0, device_total_bytes: int = 0,
                   allocation_type: str | None = None) -> None:
        """Records an OUT_OF_MEMORY event: a request of ``requested_bytes`` on
        ``device`` failed (what the device had free and in total, if known).
        Sources call it (the CUDA history's OOM observer); a test can too, to
        simulate one on CPU. The requesting stack is captured when stacks are on."""
        self._record_oom(requested_bytes, device, stream, device_free_bytes, device_total_bytes,
                         allocation_type)

    # -- statistics ------------------------------------------------------------
    def _make_stats(self, counters: Counters, usage_by_type: dict[str, int],
                    usage_by_device: dict[int, int]) -> MemoryStatistics:
        allocated, freed, current, peak, n_alloc, n_free = counters
        return MemoryStatistics(
            total_allocated_bytes=allocated,
            total_freed_bytes=freed,
            current_usage_bytes=current,
            peak_usage_bytes=peak,
            allocation_count=n_alloc,
            deallocation_count=n_free,
            average_allocation_size_bytes=allocated / n_alloc if n_alloc else 0.0,
            usage_by_type=usage_by_type,
            usage_by_device=usage_by_device,
            gc_count=self._gc.next_index,
            total_gc_time_ns=self._gc_total_ns,
            gc_count_by_generation=dict(self._gc_count_by_generation),
        )

    def get_statistics(self) -> MemoryStatistics:
        """Exact totals over the whole run; costs O(types + devices)."""
        names = self._type_names()
        by_type = {names[t]: c[2] for t, c in self._per_type()}
        by_device = {d: c[2] for d, c in self._per_device()}
        return self._make_stats(Counters(*self._counters()), by_type, by_device)

    # -- counters (the read API) ------------------------------------------------
    @property
    def type_names(self) -> list[str]:
        """Allocation type names by type id ("GPU", "CPU", "Pinned", user strings)."""
        return list(self._type_names())

    def counters(self, allocation_type: str | None = None,
                 device: int | None = None) -> Counters:
        """The exact counters of one slice: an allocation type (None: all types)
        on a device (None: all devices; -1: host memory). O(1)."""
        device = check_device(device)
        type_id = None
        if allocation_type is not None:
            names = self._type_names()
            if allocation_type not in names:
                return _NO_COUNTERS
            type_id = names.index(allocation_type)
        return Counters(*self._counters(type_id, device))

    def counters_by_type_and_device(self) -> dict[tuple[str, int], Counters]:
        """Counters of every (allocation type, device) pair that was ever
        allocated, ordered by type id then device (-1, host, first)."""
        names = self._type_names()
        devices = sorted(d for d, _ in self._per_device())
        out: dict[tuple[str, int], Counters] = {}
        for t, _ in self._per_type():
            for d in devices:
                c = Counters(*self._counters(t, d))
                if c.allocation_count:
                    out[(names[t], d)] = c
        return out

    def get_statistics_for_type(self, allocation_type: str) -> MemoryStatistics:
        """Totals for one allocation type ("GPU", "CPU", "Pinned" or a user string)."""
        if not isinstance(allocation_type, str):
            raise TypeError(f"allocation_type must be a str, not {type(allocation_type).__name__}")
        names = self._type_names()
        if allocation_type not in names:
            return self._make_stats(_NO_COUNTERS, {}, {})
        type_id = names.index(allocation_type)
        counters = Counters(*self._counters(type_id, None))
        by_device = {}
        for d, _ in self._per_device():
            current = self._counters(type_id, d)[2]
            if current:
                by_device[d] = current
        return self._make_stats(counters, {allocation_type: counters.current_bytes}, by_device)

    def get_statistics_for_device(self, device: int | None) -> MemoryStatistics:
        """Totals for one device (-1 = host memory; None = all devices, as get_statistics)."""
        device = check_device(device)
        if device is None:
            return self.get_statistics()
        names = self._type_names()
        by_type = {}
        for t, _ in self._per_type():
            current = self._counters(t, device)[2]
            if current:
                by_type[names[t]] = current
        counters = Counters(*self._counters(None, device))
        return self._make_stats(counters, by_type, {device: counters.current_bytes})

    def reset_peak(self, allocation_type: str | None = None, device: int | None = None) -> None:
        """Sets peak := current for the matching counters: an allocation type
        (None: all) on a device (None: all devices; -1: host memory only)."""
        device = check_device(device)
        type_id = -1
        if allocation_type is not None:
            names = self._type_names()
            if allocation_type not in names:
                return
            type_id = names.index(allocation_type)
        self._reset_peak(type_id, _ALL_DEVICES if device is None else device)

    @property
    def anomalies(self) -> AnomalyReport:
        """Counts of bad input by kind, and the last few examples of each:
        ``{"counts": {kind: n}, "total": n, "examples": [...]}`` (also callable).
        A loaded trace answers what the live profiler had counted."""
        counts = self._anomaly_counts()
        examples = self._anomaly_examples()
        if self._saved_anomalies is not None:
            saved, saved_examples = self._saved_anomalies
            for kind, n in saved.items():
                counts[kind] = counts.get(kind, 0) + n
            examples = saved_examples + examples
        return AnomalyReport(counts=counts, total=sum(counts.values()), examples=examples)

    # -- events ----------------------------------------------------------------
    def _read_rows(self, start_seq: int, end_seq: int) -> np.ndarray:
        return events_from_bytes(self._read_events(start_seq, end_seq))

    @property
    def next_seq(self) -> int:
        """The seq the next recorded event gets (= events recorded so far)."""
        return self._next_seq()

    @property
    def first_retained_seq(self) -> int:
        """The oldest seq still in memory (older events are in storage, if any)."""
        return self._first_retained_seq()

    def read_rows(self, start_seq: int | None = None, end_seq: int | None = None, *,
                  since_ns: int | None = None) -> np.ndarray:
        """Events still in memory as an EVENT_DTYPE array (no object per event).

        Seqs ``[start_seq, end_seq)`` (default: everything retained), from
        wall-clock time ``since_ns`` on when given. Older events, gone from
        memory, are not read from storage here (``get_event_rows`` does that).
        """
        start = self._first_retained_seq() if start_seq is None else max(
            _check_nonneg_int(start_seq, "start_seq"), self._first_retained_seq())
        if since_ns is not None:
            since_ns = epoch_ns(since_ns=since_ns)
            start = max(start, self._first_seq_at_or_after_time(since_ns))
        end = _NO_END if end_seq is None else _check_nonneg_int(end_seq, "end_seq")
        if end <= start:
            return empty_events()
        return self._read_rows(start, end)

    def write_event_columns(self, fd: int, start_seq: int, end_seq: int, kind: bytes) -> int:
        """Writes events ``[start_seq, end_seq)`` to file descriptor ``fd`` as
        column-chunk frames of kind ``kind`` (the SQLite writer's protocol),
        without building rows and with the GIL released; returns the count."""
        return self._write_event_columns(fd, start_seq, end_seq, kind)

    def _older_rows(self, before_seq: int, **query: Any) -> np.ndarray:
        """Events that left memory, from storage (empty without one)."""
        if self.storage is None or before_seq == 0:
            return empty_events()
        if self._pump is not None:
            self._pump.flush()
        return self.storage.read_events(before_seq=before_seq, **query)

    def get_event_rows(self, start_step: int = 0, end_step: int | None = None) -> np.ndarray:
        """Events of steps ``start_step..end_step`` (inclusive) as an EVENT_DTYPE array."""
        start_step = _check_nonneg_int(start_step, "start_step")
        end = _NO_END if end_step is None else _check_nonneg_int(end_step, "end_step")
        if end < start_step:
            return empty_events()
        first = self._first_retained_seq()
        a, b = self._seq_range_for_steps(start_step, end)
        rows = self._read_rows(a, b)
        if first > 0 and a <= first:
            old = self._older_rows(first, start_step=start_step, end_step=end_step)
            if len(old):
                rows = np.concatenate([old, rows])
        return rows

    def get_events(self, start_step: int = 0, end_step: int | None = None) -> EventList:
        """Events of steps ``start_step..end_step`` (inclusive), in order: a sequence
        of MemoryEvent over the rows (``.rows``), each object made when read."""
        return EventList(self.get_event_rows(start_step, end_step), self.to_memory_events)

    def get_allocations_since(self, t: datetime.datetime | float | int | None = None, *,
                              since_ns: int | None = None) -> EventList:
        """Allocation and reallocation events at or after ``t`` (a datetime, or epoch
        seconds as an int or float), or at or after ``since_ns`` (integer ns since
        the epoch, the ``timestamp_ns`` scale: exact), as ``get_events`` gives them.

        A float holds epoch seconds to about 0.24 us: an event whose own float
        timestamp (``timestamp_ns / 1e9``) is ``t`` is always found, and so are
        those up to one float step before it; a datetime (microseconds) finds
        events from 1 us before it. See ``torchmem._checks.epoch_ns``.
        """
        ts = epoch_ns(t, since_ns)
        first = self._first_retained_seq()
        a = self._first_seq_at_or_after_time(ts)
        rows = self._read_rows(a, _NO_END)
        if first > 0 and a <= first:
            old = self._older_rows(first, since_ns=ts)
            if len(old):
                rows = np.concatenate([old, rows])
        rows = rows[allocating(rows["kind"])]
        return EventList(rows, self.to_memory_events)

    def allocation_totals_by_stack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allocation and reallocation events grouped by site key
        (``analysis.sites.site_keys``): arrays (keys ascending, bytes, counts)
        over the events kept in memory (a loaded trace: all of its events)."""
        return allocation_sums(self.read_rows())

    def iter_event_rows(self, batch: int = 1 << 16) -> Iterator[np.ndarray]:
        """Every event the profiler can answer for (storage included), by seq,
        as EVENT_DTYPE arrays of at most ``batch`` rows (exports stream them)."""
        self.flush()
        rows = self.get_event_rows(0, None)
        for start in range(0, len(rows), batch):
            yield rows[start:start + batch]

    def to_memory_events(self, rows: np.ndarray) -> list[MemoryEvent]:
        """MemoryEvent objects for EVENT_DTYPE rows."""
        return to_memory_events(rows, self._type_names(), self.resolve_stack, self._details,
                                self.resolve_context)

    def _details(self, kind: int, index: int) -> dict | None:
        ooms = self.oom_events if kind == MemoryEventType.OUT_OF_MEMORY else []
        if kind == MemoryEventType.SNAPSHOT and index < self._snaps.first:
            snap = self._snaps.stored(self.storage, index)
            return None if snap is None else {"snapshot": snap}
        if kind == MemoryEventType.GC_END and index < self._gc.first:
            rec = self._gc.stored(self.storage, index)
            return None if rec is None else {"gc": rec}
        # Indexed by record number, as marker_details does, without copies.
        return marker_details(kind, index, self._snaps, self._gc, ooms)  # type: ignore[arg-type]

    @property
    def oom_events(self) -> list[OomEvent]:
        """Out-of-memory failures (OomEvent: requested bytes, device, free/total,
        live bytes), oldest first."""
        if self._saved_ooms is not None:
            return list(self._saved_ooms)
        return [OomEvent.from_dict(o) for o in self._oom_events()]

    def resolve_stack(self, stack_id: int) -> StackTrace | None:
        """The StackTrace of an interned stack id (None for 0)."""
        return self._stacks.resolve(int(stack_id))

    # -- attribution: contexts and marks ----------------------------------------
    def resolve_context(self, context_id: int) -> tuple[str, str]:
        """``(module path, phase)`` of a context id; ``("", "other")`` for 0."""
        return self._contexts.resolve(int(context_id))

    def context_table(self) -> list[tuple[str, str]]:
        """Every context id's ``(module path, phase)``, by id."""
        return list(self._contexts.table())

    def add_marks(self, marks: list[tuple[int, str, int]], validate: bool = True) -> None:
        """Notes ``(address, category, context_id)`` facts as of now (see
        torchmem._contexts); the context source calls it, with
        ``validate=False`` for the marks it made itself (checked where made)."""
        if not marks:
            return
        with self._lock:
            self._marks.append(self._next_seq(), marks, validate)

    def attribution_marks(self, start: int = 0) -> np.ndarray:
        """Every mark so far as a MARK_DTYPE array (torchmem._contexts), oldest first;
        from the ``start``-th on (a reader that keeps up reads only the new ones).
        Marks that left memory (``release_stored``) are read back from the storage."""
        start = _check_nonneg_int(start, "start")
        with self._lock:
            first = self._marks.first
            held = self._marks.array(start)
        if start >= first:
            return held
        older = self.storage.read_side_records("marks", start, first)
        return np.concatenate([older, held]) if len(held) else older

    def live_attribution_marks(self) -> np.ndarray:
        """Without reading the storage, a MARK_DTYPE array that holds every mark made
        on an allocation live now (and more: every mark held in memory), oldest
        first: what a category of the moment "now" needs (``model_state``)."""
        with self._lock:
            held, kept = self._marks.array(), self._marks.kept
        return np.concatenate([kept, held]) if len(kept) else held

    def live_seqs(self, addresses: list[int]) -> list[tuple[int, int]]:
        """For each address, ``(seq, context_id)`` of its live allocation; seq is
        2**64-1 for an address that is not live. One lock for all of them."""
        return self._live_seqs(addresses)

    @property
    def peak_seq(self) -> int | None:
        """The seq of the event after which ``peak_usage_bytes`` was first reached
        (after ``reset_peak()``: the last event then); None while the peak is 0."""
        seq = self._peak_seq()
        return None if seq == _NO_END else seq

    # -- what the memory is for (torchmem.analysis.breakdown) -------------------
    def _queries(self) -> Any:
        if MemoryProfiler.queries is None:
            raise RuntimeError("torchmem.analysis.breakdown is not imported (import torchmem)")
        return MemoryProfiler.queries

    def breakdown(self, by: str = "category", at: Any = "peak",
                  device: int | None = None) -> dict[str, int]:
        """Live bytes at a moment, grouped, largest first; the values add up exactly
        to the live bytes then (``peak_usage_bytes`` for ``"peak"``).

        ``by``: ``"category"`` (parameter, buffer, gradient, optimizer_state,
        input, activation, temporary, other), ``"module"`` (the owning module's
        path, e.g. ``"Net.fc1"``; "(none)" outside any), ``"phase"`` (forward,
        backward, optimizer, other: when the bytes were allocated), ``"site"``
        (the user's line, ``file:line in function``), ``"type"`` or ``"device"``
        ("host", "cuda:N"). ``at``: ``"peak"`` (the overall peak), ``"now"``,
        or a step number (the highest live bytes among that step's events).
        ``device`` (-1: host; None: all): that device's bytes only, at its own
        peak for ``"peak"``.
        """
        return self._queries().breakdown(self, by, at, device)

    def peak_report(self, top: int = 10) -> Any:
        """The overall peak and each step's: when (step, time, phase, module), how
        many bytes, and the breakdown by category, module and site (the ``top``
        largest modules and sites); a PeakReport (``.format()`` for text)."""
        return self._queries().peak_report(self, top)

    def step_peaks(self) -> list:
        """Each step's memory (analysis.steps.StepMemory, bytes): its peak, where it
        was first reached (``peak_seq``, ``peak_timestamp_ns``), the highest live
        bytes in its forward, backward, optimizer and other events
        (``peak_by_phase``), steps in order."""
        return self._queries().step_peaks(self)

    def event_rows_from(self, start_seq: int = 0) -> np.ndarray:
        """Events with ``seq >= start_seq`` (from storage too, where retention dropped
        them), as an EVENT_DTYPE array by seq."""
        start_seq = _check_nonneg_int(start_seq, "start_seq")
        first = self._first_retained_seq()
        rows = self._read_rows(start_seq, _NO_END)
        if start_seq < first:
            old = self._older_rows(first)
            if len(old):
                old = old[old["seq"] >= np.uint64(start_seq)]
                rows = np.concatenate([old, rows])
        return rows

    # -- live allocations and leaks --------------------------------------------
    def live_allocations(self) -> np.ndarray:
        """Every live allocation as a LIVE_DTYPE array, oldest first."""
        return np.frombuffer(self._live(), dtype=LIVE_DTYPE)

    def type_name(self, type_id: int) -> str:
        """The allocation type string of a type id ("" for markers)."""
        names = self._type_names()
        return names[type_id] if type_id < len(names) and type_id != TYPE_NONE else ""

    def potential_leak_rows(self, min_age_seconds: float = 0.0,
                            min_age_steps: int = 0, *,
                            include_model_state: bool = False) -> np.ndarray:
        """The live allocations ``detect_potential_leaks`` reports, as LIVE_DTYPE
        rows in its order (largest first, then oldest): counts and byte totals
        without a Python object per allocation."""
        min_age_seconds = check_seconds(min_age_seconds, "min_age_seconds")
        min_age_steps = _check_nonneg_int(min_age_steps, "min_age_steps")
        live = self.live_allocations()
        # Clamped to int64: a cutoff before any time or step is "nothing is that old".
        cutoff_ns = max(time.time_ns() - int(min_age_seconds * 1e9), -2**63)
        last_step = max(self.current_step - min_age_steps, -2**63)
        keep = (live["timestamp_ns"] <= cutoff_ns) & (
            live["step"].astype(np.int64) <= last_step)
        live = live[keep]
        if not include_model_state and len(live) and MemoryProfiler.queries is not None:
            live = live[~MemoryProfiler.queries.model_state(self, live)]
        return live[np.lexsort((live["seq"], -live["size"].astype(np.int64)))]

    def detect_potential_leaks(self, min_age_seconds: float = 0.0,
                               min_age_steps: int = 0, top: int | None = None, *,
                               include_model_state: bool = False) -> list[Leak]:
        """Live allocations at least this old, largest first (the first ``top``
        of them; None: all).

        Age is wall-clock seconds since the allocation and training steps
        since it (both filters apply). Parameters, buffers, gradients and
        optimizer state, alive by design, are left out unless
        ``include_model_state`` (what attribution knows them to be; see
        ``breakdown``). Only the Leak objects returned are made
        (``potential_leak_rows`` gives all of them as an array).
        """
        if top is not None:
            _check_nonneg_int(top, "top")
        rows = self.potential_leak_rows(min_age_seconds, min_age_steps,
                                        include_model_state=include_model_state)
        if top is not None:
            rows = rows[:top]
        return [Leak(int(r["address"]), int(r["size"]), self.resolve_stack(int(r["stack_id"])))
                for r in rows]

    # -- lifecycle -------------------------------------------------------------
    def flush(self) -> None:
        """Hands every event recorded so far to the storage and publisher, and
        returns once the storage has committed them: another process (or
        ``torchmem.load``) then reads every one. A storage that cannot commit
        (a stalled or failed writer) is waited for a bounded time, with a warning."""
        if self._pump is not None:
            self._pump.flush(commit=True)

    def close(self) -> None:
        """Stops background threads and flushes and closes the sinks."""
        self.disable()
        if self._pump is not None:
            self._pump.stop()

    def set_consumer_seq(self, seq: int) -> None:
        """Every sink has the events before ``seq``: the ring may drop them
        (the pump calls it; events no sink has read are never dropped)."""
        self._set_consumer_seq(seq)

    def sink_delta(self, cursors: dict[str, int], with_events: bool = True) -> TraceDelta:
        """Everything new since ``cursors`` (updated in place), as a TraceDelta.

        ``with_events=False`` leaves the events out (the delta's events are
        empty; cursors["seq"] still moves past them): the caller sends them
        from the recorder itself.
        """
        with self._lock:
            end = self._next_seq()
            start = cursors.get("seq", 0)
            delta = TraceDelta(
                events=self._read_rows(start, end) if with_events else empty_events(),
                type_names=self._type_names(),
                frames_start=cursors.get("frames", 0),
                nodes_start=cursors.get("nodes", 0),
                gc_records=self._gc.since(cursors.get("gc", 0)),
                gc_start=cursors.get("gc", 0),
                snapshots=self._snaps.since(cursors.get("snapshots", 0)),
                snapshots_start=cursors.get("snapshots", 0),
                anomalies=self._anomaly_counts(),
            )
            total = sum(delta.anomalies.values())
            if total != cursors.get("anomalies", 0):
                delta.anomaly_examples = self._anomaly_examples()
            ooms = self.oom_events
            delta.ooms_start = cursors.get("ooms", 0)
            delta.ooms = ooms[delta.ooms_start:]
            delta.contexts_start = cursors.get("contexts", 0)
            delta.contexts = self.context_table()[delta.contexts_start:]
            delta.marks_start = cursors.get("marks", 0)
            delta.marks = self._marks.tuples(delta.marks_start)
            delta.frames = [tuple(f) for f in _recorder.stack_frames_since(delta.frames_start)]
            delta.stack_nodes = np.frombuffer(_recorder.stack_nodes_since(delta.nodes_start),
                                              dtype=STACK_NODE_DTYPE)
            if len(delta.events):
                end = int(delta.events["seq"][-1]) + 1
            cursors.update(seq=end, frames=delta.frames_start + len(delta.frames),
                           nodes=delta.nodes_start + len(delta.stack_nodes),
                           gc=self._gc.next_index,
                           snapshots=self._snaps.next_index,
                           ooms=len(ooms), anomalies=total,
                           contexts=delta.contexts_start + len(delta.contexts),
                           marks=delta.marks_start + len(delta.marks))
        return delta

    @classmethod
    def from_trace(cls, delta: Any, source: str | None = None, *,
                   retention_events: int | None = None) -> "MemoryProfiler":
        """A read-only profiler over a saved trace (one TraceDelta holding it all).

        ``retention_events`` (default: all of ``delta``'s events) is how many
        events it keeps in memory; ``extend_from_trace`` adds the rest of a
        trace that is still being written. Raises ValueError or TypeError
        (one line) for content no recorder could have written in the events
        or the stack table; the storage loaders turn it into TraceFormatError.
        Side records of the wrong shape (``torchmem._records``) are skipped,
        counted in ``skipped_side_records`` and named in one RuntimeWarning
        (``source``: the file, for the message); their marker events then
        have no details.
        """
        retention = retention_events if retention_events is not None else len(delta.events)
        prof = cls(retention_events=max(retention, 1), auto_snapshot=False)
        prof.disable()
        prof._stacks = SavedStacks()
        prof._contexts = SavedContexts()
        prof._saved_ooms = []
        prof.extend_from_trace(delta, source)
        return prof

    def extend_from_trace(self, delta: Any, source: str | None = None) -> None:
        """Adds the next part of a saved trace to a profiler made by ``from_trace``.

        ``delta`` holds the events that follow the ones replayed so far and
        the side records (types, frames, stack nodes, contexts, attribution
        marks, GC records, snapshots, OOMs) from their start indices on, as a
        trace reader gives them (``torchmem.storage.follow.TraceFollower``).
        Malformed side records are skipped as ``from_trace`` says (one warning
        when more are).
        """
        if not isinstance(self._stacks, SavedStacks):
            raise TypeError("extend_from_trace needs a profiler made by from_trace")
        events = delta.events
        check_event_rows(events, len(delta.type_names))
        for name in delta.type_names:
            self._type_id(name)
        self._stacks.extend(delta.frames, delta.frames_start, delta.stack_nodes,
                            delta.nodes_start)
        self._contexts.extend(delta.contexts, delta.contexts_start)
        # Marks only grow: the ones this profiler holds already are skipped.
        held = len(self._marks)
        if delta.marks_start > held:
            raise ValueError(f"marks from index {delta.marks_start} follow {held} marks")
        self._marks.extend([(int(q), int(a), str(c), int(x))
                            for q, a, c, x in delta.marks[held - delta.marks_start:]])
        events = np.array(events, copy=True)  # marker indices may be renumbered below
        sides = self._side_maps
        self._gc.items = keep_records(sides, self._gc.items, delta.gc_start,
                                        delta.gc_records, gc_record_ok, events,
                                        int(MemoryEventType.GC_END), "GC records")
        self._gc_count_by_generation = {}
        for rec in self._gc.items:
            self._gc_count_by_generation[rec.generation] = (
                self._gc_count_by_generation.get(rec.generation, 0) + 1)
        self._gc_total_ns = sum(rec.duration_ns for rec in self._gc.items)
        self._snaps.items = keep_records(sides, self._snaps.items, delta.snapshots_start,
                                       delta.snapshots, snapshot_ok, events,
                                       int(MemoryEventType.SNAPSHOT), "snapshots")
        self._saved_ooms = keep_records(sides, self._saved_ooms, delta.ooms_start,
                                        [oom_or_none(o) for o in delta.ooms], oom_ok, events,
                                        int(MemoryEventType.OUT_OF_MEMORY), "OOM records")
        skipped = {name: maps.count(-1) for name, maps in sides.items() if -1 in maps}
        if delta.anomalies or delta.anomaly_examples:  # the trace's totals so far
            counts = delta.anomalies if isinstance(delta.anomalies, dict) else {}
            good = {k: n for k, n in counts.items()
                    if isinstance(k, str) and type(n) is int and n >= 0}
            examples = delta.anomaly_examples
            if not isinstance(examples, list):
                examples, skipped["anomaly examples"] = [], 1
            kept = [e for e in examples if anomaly_example_ok(e)]
            for kind, n in (("anomaly counts", len(counts) - len(good)),
                            ("anomaly examples", len(examples) - len(kept))):
                if n:
                    skipped[kind] = skipped.get(kind, 0) + n
            self._saved_anomalies = (good, kept)
        else:
            for kind in ("anomaly counts", "anomaly examples"):
                if kind in self.skipped_side_records:
                    skipped[kind] = self.skipped_side_records[kind]
        if sum(skipped.values()) > sum(self.skipped_side_records.values()):
            said = ", ".join(f"{kind}: {skipped[kind]}" for kind in SIDE_RECORD_KINDS
                             if kind in skipped)
            warnings.warn(f"torchmem: {source or 'a trace'}: skipped malformed side records "
                          f"({said}); everything else loaded (profiler.skipped_side_records)",
                          RuntimeWarning, stacklevel=3)
        self.skipped_side_records = skipped
        self._replay(np.ascontiguousarray(events))

