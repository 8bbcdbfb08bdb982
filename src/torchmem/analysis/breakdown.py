"""Live bytes at a moment, grouped: ``breakdown``; the peaks and what made them: ``peak_report``.

A moment is the state right after one event: ``"peak"`` (the profiler's
``peak_seq``: when ``peak_usage_bytes`` was first reached), ``"now"`` (the
latest event), or a step number (the moment of the highest live bytes among
that step's events). Every breakdown adds up exactly to the live bytes at
its moment. Keys by ``by``:

- ``category``: torchmem.analysis.categories.CATEGORIES;
- ``module``: the module path owning the bytes (a parameter's, buffer's,
  gradient's or optimizer state's module; otherwise the module whose forward
  or backward allocated them; "(none)" outside any module);
- ``phase``: the phase the bytes were allocated in (forward, backward,
  optimizer, other);
- ``site``: the user's line that allocated them (the first frame outside
  torch and torchmem: ``file:line in function``, analysis.sites.site_name;
  "(no stack captured)" without one);
- ``type``: the allocation type ("CPU", "GPU", "Pinned", ...);
- ``device``: "host" or "cuda:N".
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..profiler import MemoryProfiler
from ..units import format_bytes
from .categories import (CATEGORIES, Lifetimes, Segments, lifetimes, live_now,
                         segments)
from ._grouping import groups_at, keyed, labelled
from .sites import site_name
from .steps import StepMemory, StepSeries, step_memory

__all__ = ["BY", "MODEL_STATE", "Peak", "PeakReport", "breakdown", "breakdown_at",
           "context_of_event", "model_state", "overall_peak", "peak_report", "read_moments",
           "step_peaks"]

BY = ("category", "module", "phase", "site", "type", "device")


def _check_by(by: str) -> None:
    if by not in BY:
        raise ValueError(f"by must be one of {', '.join(BY)}; got {by!r}")


class _Moments:
    """One profiler's lifetimes, marks and contexts, read once for several moments;
    with ``device`` (-1: host), that device's allocations only (its own peak)."""

    def __init__(self, profiler: Any, lt: Lifetimes | None = None,
                 device: int | None = None, marks: np.ndarray | None = None) -> None:
        self.profiler = profiler
        self.lt = lt if lt is not None else lifetimes(profiler)
        self.device = device
        self._usage: np.ndarray | None = None
        # A window's lifetimes come with the marks that bear on them (analysis.windows).
        self.marks = marks if marks is not None else profiler.attribution_marks()
        self.contexts = profiler.context_table()
        rows = self.lt.rows
        last = rows[-1] if len(rows) else None
        self.current_step = max(int(last["step"]) if last is not None else 0,
                                profiler.current_step)
        self.current_ctx = int(last["context_id"]) if last is not None else 0
        self._sites: dict[int, str] = {}
        self._segments: Segments | None = None

    def seq_of(self, at: Any) -> int | None:
        """The event seq of a moment; None when there is none (no events)."""
        p, rows = self.profiler, self.lt.rows
        if at == "now":
            return p.next_seq - 1 if p.next_seq else None
        if at == "peak":
            if self.device is None:
                return p.peak_seq
            usage = self.usage()
            if not len(usage) or usage.max() <= 0:
                return None
            return int(rows["seq"][int(np.argmax(usage))])  # the first moment at it
        if isinstance(at, (int, np.integer)) and not isinstance(at, bool):
            if at < 0:
                raise ValueError(f"at: a step is >= 0, got {at}")
            in_step = np.flatnonzero(rows["step"] == np.uint64(at))
            if not len(in_step):
                raise ValueError(f"at={at}: no events of step {at} are held")
            usage = self.usage()[in_step]
            return int(rows["seq"][in_step[int(np.argmax(usage))]])
        raise ValueError(f'at must be "peak", "now" or a step number; got {at!r}')

    def check_held(self, seq: int) -> None:
        if seq < self.lt.first_seq - 1:
            raise ValueError(f"the moment after event {seq} is no longer held (the ring keeps "
                             f"events from {self.lt.first_seq} on); give the profiler a storage "
                             "backend to query older moments")

    def usage(self) -> np.ndarray:
        """Live bytes (of ``device``, or all) right after each held event."""
        if self._usage is None:
            if self.device is None:
                self._usage = self.lt.usage()
            else:
                lt = self.lt
                on = lt.device == self.device
                at = lt.rows["seq"].astype(np.int64)
                starts, ends = np.sort(lt.alloc_seq[on]), np.sort(lt.free_seq[on])
                sizes_s = lt.size[on][np.argsort(lt.alloc_seq[on], kind="stable")]
                sizes_e = lt.size[on][np.argsort(lt.free_seq[on], kind="stable")]
                began = np.r_[0, np.cumsum(sizes_s)][np.searchsorted(starts, at, side="right")]
                ended = np.r_[0, np.cumsum(sizes_e)][np.searchsorted(ends, at, side="right")]
                self._usage = (began - ended).astype(np.int64)
        return self._usage

    def usage_at(self, seq: int) -> int:
        i = seq - self.lt.first_seq
        usage = self.usage()
        if 0 <= i < len(usage):
            return int(usage[i])
        live = self.lt.live_at(seq)
        if self.device is not None:
            live = live[self.lt.device[live] == self.device]
        return int(self.lt.size[live].sum())

    @property
    def segments(self) -> Segments:
        if self._segments is None:
            self._segments = segments(self.lt, self.marks, self.contexts,
                                      current_step=self.current_step,
                                      current_ctx=self.current_ctx)
        return self._segments

    def groups(self, seq: int, by: str) -> dict[str, int]:
        """Live bytes right after event ``seq`` by ``by``, largest first."""
        seg = self.segments
        live = (seg.start <= seq) & (seg.end > seq)
        if self.device is not None:
            live &= self.lt.device[seg.alloc] == self.device
        keys, label = keyed(self, by)
        return labelled(keys[live], self.lt.size[seg.alloc[live]], label)

    def context(self, ctx: int) -> tuple[str, str]:
        return self.contexts[ctx] if 0 <= ctx < len(self.contexts) else ("", "other")

    def site(self, stack_id: int) -> str:
        label = self._sites.get(stack_id)
        if label is None:  # the one definition of a site (analysis.sites)
            label = self._sites[stack_id] = site_name(
                self.profiler.resolve_stack(stack_id) if stack_id else None)
        return label


def read_moments(profiler: Any) -> _Moments:
    """The profiler's events read once, for several queries of a report (their
    ``moments=`` argument: peak_report, and analysis.timeline's)."""
    return _Moments(profiler)


def breakdown(profiler: Any, by: str = "category", at: Any = "peak",
              device: int | None = None) -> dict[str, int]:
    """Live bytes at the moment ``at`` grouped by ``by`` (module docstring), largest
    first; the values add up exactly to the live bytes then (``peak_usage_bytes``
    for ``"peak"``). Empty before the first allocation. ``device`` (-1: host;
    None: all) keeps that device's bytes, at that device's own peak for
    ``"peak"`` and its highest moment of the step for a step.

    Raises ValueError for an unknown ``by`` or ``at``, a step without events, or a
    moment whose events the profiler no longer holds (no storage backend).
    """
    _check_by(by)
    if device is not None and (not isinstance(device, int) or isinstance(device, bool)
                               or device < -1):
        raise ValueError(f"device must be -1 (host), a device index or None; got {device!r}")
    if at == "now":  # the live map alone: no event is read
        m = _Moments(profiler, live_now(profiler), device)
    else:
        m = _Moments(profiler, device=device)
    seq = m.seq_of(at)
    if seq is None:
        return {}
    m.check_held(seq)
    return m.groups(seq, by)


#: The categories alive by design: possible-leak lists leave them out.
MODEL_STATE = ("parameter", "buffer", "gradient", "optimizer_state")


def model_state(profiler: Any, live: np.ndarray) -> np.ndarray:
    """For LIVE_DTYPE rows of ``profiler``: whether each is, now, a parameter,
    buffer, gradient or optimizer state (bool array)."""
    # Only the marks on live allocations bear on them (a mark applies to the
    # allocation live at its address when made): those a live run keeps in
    # memory, so an epoch check reads no old marks from the storage.
    live_marks = getattr(profiler, "live_attribution_marks", None)
    m = _Moments(profiler, live_now(profiler),
                 marks=live_marks() if live_marks is not None else None)
    seq = m.seq_of("now")
    if seq is None or not len(live):
        return np.zeros(len(live), bool)
    c = m.segments.at(seq)
    codes = [CATEGORIES.index(k) for k in MODEL_STATE]
    held = m.lt.alloc_seq[c.index[np.isin(c.category, codes)]]
    return np.isin(live["seq"].astype(np.int64), held)


def breakdown_at(profiler: Any, seq: int, by: str = "category",
                 device: int | None = None) -> dict[str, int]:
    """``breakdown`` at the moment right after event ``seq`` (an OUT_OF_MEMORY
    event's, say); ValueError when the profiler no longer holds that moment."""
    _check_by(by)
    m = _Moments(profiler, device=device)
    m.check_held(seq)
    return m.groups(seq, by)


def context_of_event(profiler: Any, seq: int) -> tuple[str, str]:
    """``(module, phase)`` running on the thread that recorded event ``seq``
    (``("", "other")`` when the event is not held)."""
    rows = profiler.event_rows_from(seq)
    if not len(rows) or int(rows["seq"][0]) != seq:
        return ("", "other")
    return profiler.resolve_context(int(rows["context_id"][0]))


def _step_records(m: _Moments) -> list[StepMemory]:
    # The rows already read, fed to the one per-step computation (analysis.steps).
    series = StepSeries(m.profiler.type_name, m.profiler.resolve_context)
    return series.feed(m.lt.rows) + series.finish()


def step_peaks(profiler: Any) -> list[StepMemory]:
    """Each step's peak live bytes, where it was first reached (``peak_seq``,
    ``peak_timestamp_ns``) and split by phase (``peak_by_phase``: the highest
    live bytes after its forward, backward, optimizer and other events), steps
    in order: analysis.steps.StepMemory."""
    return list(step_memory(profiler))


@dataclass
class Peak:
    """One peak: when (step, time, the phase and module of the event that reached
    it), how many live bytes, and the breakdowns then (bytes, largest first;
    ``by_module`` and ``by_site`` keep the ``top`` largest)."""

    seq: int
    step: int
    timestamp_ns: int
    phase: str
    module: str
    bytes: int
    by_category: dict[str, int]
    by_module: dict[str, int]
    by_site: dict[str, int]
    by_phase: dict[str, int] = field(default_factory=dict)

    def headline(self) -> str:
        """One line: "peak 1.28 MiB at step 37, backward of Net.fc2: activation 41%, ..."."""
        where = f"{self.phase} of {self.module}" if self.module else self.phase
        parts = ", ".join(f"{k} {100 * v / self.bytes:.0f}%"
                          for k, v in self.by_category.items() if v) if self.bytes else ""
        return (f"peak {format_bytes(self.bytes)} at step {self.step}, {where}"
                + (f": {parts}" if parts else ""))


@dataclass
class PeakReport:
    """The overall peak and every step's (see Peak); ``overall`` is None before
    the first allocation."""

    overall: Peak | None
    steps: list[Peak]

    def format(self, top: int = 5) -> str:
        """The report as text: the overall peak and its breakdowns, then one line a step."""
        if self.overall is None:
            return "no allocations recorded"
        p = self.overall
        lines = [p.headline()]
        for title, d in (("by category", p.by_category), ("by module", p.by_module),
                         ("by site", p.by_site)):
            lines.append(f"  {title}:")
            for k, v in list(d.items())[:top]:
                lines.append(f"    {format_bytes(v):>12}  {100 * v / p.bytes:5.1f}%  {k}"
                             if p.bytes else f"    {format_bytes(v):>12}  {k}")
        if self.steps:
            lines.append("  step peaks (forward / backward / optimizer):")
            for s in self.steps:
                phases = " / ".join(format_bytes(s.by_phase[ph]) if ph in s.by_phase else "-"
                                    for ph in ("forward", "backward", "optimizer"))
                where = f"{s.phase} of {s.module}" if s.module else s.phase
                lines.append(f"    step {s.step}: {format_bytes(s.bytes)} in {where} ({phases})")
        return "\n".join(lines)


def _peak(m: _Moments, seq: int, top: int, by_phase: dict[str, int] | None = None,
          groups: dict[str, dict[str, int]] | None = None) -> Peak:
    """The Peak at moment ``seq``; ``groups`` (by category, module, site) when already known."""
    rows, first = m.lt.rows, m.lt.first_seq
    i = seq - first
    row = rows[i] if 0 <= i < len(rows) else None
    module, phase = m.context(int(row["context_id"])) if row is not None else ("", "other")
    g = groups or {by: m.groups(seq, by) for by in ("category", "module", "site")}
    cut = lambda d: dict(list(d.items())[:top])  # noqa: E731
    return Peak(seq=seq, step=int(row["step"]) if row is not None else 0,
                timestamp_ns=int(row["timestamp_ns"]) if row is not None else 0,
                phase=phase, module=module, bytes=m.usage_at(seq),
                by_category=g["category"], by_module=cut(g["module"]),
                by_site=cut(g["site"]), by_phase=dict(by_phase or {}))


def _step_peak_reports(m: _Moments, top: int) -> list[Peak]:
    """Every step's Peak, their breakdowns computed together (analysis._grouping)."""
    steps = _step_records(m)
    seqs = np.array([s.peak_seq for s in steps], np.int64)
    g = {by: groups_at(m, seqs, by) for by in ("category", "module", "site")}
    return [_peak(m, s.peak_seq, top, s.peak_by_phase, {by: g[by][i] for by in g})
            for i, s in enumerate(steps)]


def overall_peak(profiler: Any, top: int = 5, *, storage: bool = True) -> Peak | None:
    """The overall peak alone (see Peak); None before any allocation or when its
    moment is older than the events held (``storage=False``: memory only, so a
    long run's trace is not read back, as the summary at exit wants)."""
    seq = profiler.peak_seq
    if seq is None:
        return None
    m = _Moments(profiler, lifetimes(profiler, storage=storage))
    if seq < m.lt.first_seq - 1:
        return None
    return _peak(m, seq, top)


def peak_report(profiler: Any, top: int = 10, *, moments: Any = None) -> PeakReport:
    """The overall peak and each step's peak: when, how much, and the breakdown by
    category (whole), by module and by site (the ``top`` largest); ``moments``:
    read_moments(profiler), shared with other queries."""
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top must be an int >= 1, got {top!r}")
    m = moments if moments is not None else _Moments(profiler)
    seq = profiler.peak_seq
    overall = None
    if seq is not None:
        m.check_held(seq)
        overall = _peak(m, seq, top)
    steps = _step_peak_reports(m, top)
    return PeakReport(overall, steps)


# The profiler's breakdown() / peak_report() / step_peaks() are these.
MemoryProfiler.queries = sys.modules[__name__]
