"""SavedTraceProfiler: a loaded trace as a read-only MemoryProfiler whose
events stay in the file (``torchmem.load``).

It is the profiler with its event queries read from the trace file
(``storage.SavedEvents``) and its totals from one native replay of every
event, a batch at a time; the recorder calls it makes are its own
(``self``), as a MemoryProfiler's.
"""

from __future__ import annotations

import datetime
from typing import Any, Iterator

import numpy as np

from ._checks import check_nonneg_int, epoch_ns
from ._contexts import SavedContexts
from ._events import (
    EventList,
    allocating,
    allocation_sums,
    check_event_rows,
    empty_events,
    merge_key_sums,
)
from ._records import renumber_markers
from ._stacks import SavedStacks
from ._types import Counters, MemoryStatistics
from .profiler import MemoryProfiler

__all__ = ["SavedTraceProfiler"]

#: A loaded trace's ring: the pass replays every event through it, and only
#: the last chunk stays (queries read the file).
_SAVED_RETENTION = 1 << 13


class SavedTraceProfiler(MemoryProfiler):
    """What ``torchmem.load`` returns: a read-only MemoryProfiler whose events
    stay in the trace file.

    Event queries read the rows they need from the file. The run's totals
    (statistics, counters, live allocations, the current step, anomalies,
    allocation totals by site) come from one pass over every event, made by
    the first query that needs them: the native replay ``from_trace`` makes,
    fed a batch at a time, so memory is bounded by the live allocations, not
    the events. The answers are those of ``from_trace`` over the same trace.
    """

    events_are_final = True
    _saved: Any = None
    _passed = False
    _in_pass = False
    _pass_error: BaseException | None = None
    _site_totals: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    @classmethod
    def from_saved(cls, side: Any, events: Any,
                   source: str | None = None) -> SavedTraceProfiler:
        """A read-only profiler over a saved trace whose events stay where they
        are (``torchmem.load``): ``side`` is the trace without its events (a
        TraceDelta), ``events`` reads them (``storage.SavedEvents``: ``read``,
        ``batches``, ``end_seq``, ``fail``, ``close``)."""
        prof = cls(retention_events=_SAVED_RETENTION, auto_snapshot=False)
        prof.disable()
        prof._stacks = SavedStacks()
        prof._contexts = SavedContexts()
        prof._saved_ooms = []
        prof.extend_from_trace(side, source=source)  # the side records; no event yet
        prof._saved = events
        return prof

    def _pass(self) -> None:
        if self._passed:
            return
        for _ in self._replaying():
            pass

    def _replaying(self) -> Iterator[np.ndarray]:
        # The pass, yielding each batch once it is replayed; a consumer that
        # stops early still leaves the pass complete.
        with self._lock:
            if self._pass_error is not None:
                raise self._pass_error
            if self._passed:
                return
            if self._in_pass:  # a query from inside iter_event_rows' loop
                raise RuntimeError("the trace's events are being read (iter_event_rows); "
                                   "ask for totals after the loop")
            self._in_pass = True
            try:
                n_types = len(self._type_names())
                sums, last, stopped = [], -1, False
                try:
                    for rows in self._saved.batches():
                        check_event_rows(rows, n_types)
                        rows = renumber_markers(rows, self._side_maps)
                        if int(rows["seq"][0]) <= last:
                            raise ValueError("event seq numbers are not increasing")
                        last = int(rows["seq"][-1])
                        self._replay(np.ascontiguousarray(rows))
                        self._set_consumer_seq(self._next_seq())  # the ring keeps one chunk
                        sums.append(allocation_sums(rows))
                        if not stopped:
                            try:
                                yield rows
                            except GeneratorExit:
                                stopped = True
                except (ValueError, TypeError, IndexError, OverflowError) as exc:
                    self._saved.fail(exc)
                self._site_totals = merge_key_sums(sums)
            except BaseException as exc:
                # A replay stopped half way cannot be resumed: every later
                # query gives the same error.
                self._pass_error = exc
                raise
            finally:
                self._in_pass = False
            self._passed = True

    def iter_event_rows(self, batch: int = 1 << 16) -> Iterator[np.ndarray]:
        """Every event of the trace, by seq, a batch at a time (read from the
        file; the first iteration is also the profiler's pass)."""
        if not self._passed:
            yield from self._replaying()
            return
        n_types = len(self._type_names())
        for rows in self._saved.batches(batch):
            try:
                check_event_rows(rows, n_types)
            except ValueError as exc:
                self._saved.fail(exc)
            yield renumber_markers(rows, self._side_maps)

    def _read(self, **query: Any) -> np.ndarray:
        rows = self._saved.read(**query)
        try:
            check_event_rows(rows, len(self._type_names()))
        except ValueError as exc:
            self._saved.fail(exc)
        return renumber_markers(rows, self._side_maps)

    # -- what needs the pass ---------------------------------------------------
    @property
    def current_step(self) -> int:
        """The last step of the trace."""
        self._pass()
        return self._get_step()

    @property
    def anomalies(self) -> dict[str, Any]:
        """Counts of bad input by kind found replaying the trace, with examples."""
        self._pass()
        return MemoryProfiler.anomalies.fget(self)  # type: ignore[attr-defined]

    def get_statistics(self) -> MemoryStatistics:
        self._pass()
        return super().get_statistics()

    def counters(self, allocation_type: str | None = None,
                 device: int | None = None) -> Counters:
        self._pass()
        return super().counters(allocation_type, device)

    def counters_by_type_and_device(self) -> dict[tuple[str, int], Counters]:
        self._pass()
        return super().counters_by_type_and_device()

    def get_statistics_for_type(self, allocation_type: str) -> MemoryStatistics:
        self._pass()
        return super().get_statistics_for_type(allocation_type)

    def get_statistics_for_device(self, device: int | None) -> MemoryStatistics:
        self._pass()
        return super().get_statistics_for_device(device)

    def reset_peak(self, allocation_type: str | None = None, device: int | None = None) -> None:
        self._pass()
        super().reset_peak(allocation_type, device)

    def live_allocations(self) -> np.ndarray:
        self._pass()
        return super().live_allocations()

    def live_seqs(self, addresses: list[int]) -> list[tuple[int, int]]:
        self._pass()
        return super().live_seqs(addresses)

    @property
    def peak_seq(self) -> int | None:
        """The seq of the event after which the peak was first reached."""
        self._pass()
        return MemoryProfiler.peak_seq.fget(self)  # type: ignore[attr-defined]

    def allocation_totals_by_stack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every allocation of the trace grouped by site key: (keys, bytes, counts)."""
        self._pass()
        assert self._site_totals is not None
        return self._site_totals

    # -- events: read from the file ----------------------------------------------
    @property
    def next_seq(self) -> int:
        """One past the trace's last seq (= its event count)."""
        return int(self._saved.end_seq)

    @property
    def first_retained_seq(self) -> int:
        """0: every event of the trace can be read."""
        return 0

    def read_rows(self, start_seq: int | None = None, end_seq: int | None = None, *,
                  since_ns: int | None = None) -> np.ndarray:
        """Events of the trace as an EVENT_DTYPE array: seqs ``[start_seq,
        end_seq)`` (default: all), from time ``since_ns`` on when given."""
        start = 0 if start_seq is None else check_nonneg_int(start_seq, "start_seq")
        end = None if end_seq is None else check_nonneg_int(end_seq, "end_seq")
        return self._read(from_seq=start, before_seq=end,
                          since_ns=None if since_ns is None else int(since_ns))

    def event_rows_from(self, start_seq: int = 0) -> np.ndarray:
        return self._read(from_seq=check_nonneg_int(start_seq, "start_seq"))

    def get_event_rows(self, start_step: int = 0, end_step: int | None = None) -> np.ndarray:
        start_step = check_nonneg_int(start_step, "start_step")
        if end_step is not None:
            check_nonneg_int(end_step, "end_step")
            if end_step < start_step:
                return empty_events()
        return self._read(start_step=start_step, end_step=end_step)

    def get_allocations_since(self, t: datetime.datetime | float | int | None = None, *,
                              since_ns: int | None = None) -> EventList:
        ts = epoch_ns(t, since_ns)
        rows = self._read(since_ns=ts)
        return EventList(rows[allocating(rows["kind"])], self.to_memory_events)

    def close(self) -> None:
        """Releases the trace file (queries that need it fail afterwards)."""
        super().close()
        if self._saved is not None:
            self._saved.close()
