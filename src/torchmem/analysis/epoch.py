"""The epoch leak check: which allocation sites hold more memory than last epoch.

At the end of every epoch (``with torchmem.epoch():`` or ``mark_epoch()``)
torchmem runs a full garbage collection, groups the live allocations by the
site that made them, and compares each site's live bytes with the previous
epoch's end. A training loop that does not leak ends every epoch holding the
same things (parameters, optimizer state, the last batch's gradients and
outputs), so any site that grows is memory the loop keeps by mistake: a list
of losses that still hold their graphs, a cache keyed by step, and so on.

The first epoch end is the baseline (parameters and optimizer state are made
in the first epoch and are not leaks); growth is reported from the second on.

Sites are grouped by their interned stack, allocation type and device
(``torchmem.analysis.sites``) and named by the site frame, the user's line.
Without stacks (``capture_stack_traces`` off) a site is only the allocation
type and device, which still says *that* memory grows but not *where*;
``torchmem.epoch()`` therefore turns stack capture on for the profiler it
checks (``stacks=False`` keeps it off).

At an epoch end that found growth, each growing site also gets its holders
(``SiteGrowth.holders``): the shortest reference paths from a root to the
tensors whose storages are the site's new allocations
(``analysis.holders``), searched once for all sites within a time budget
(``holders_budget_s``, default 2 s); ``holders=False`` skips the search.

Every function here takes the profiler to check; ``torchmem.epoch`` and
``torchmem.mark_epoch`` (module ``torchmem.epoch``) default to the session's.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..sources.gc_monitor import collect_unreported
from ..units import format_bytes
from .epoch_holders import site_holders
from .epoch_records import record_of, store_records, trace_records
from .holders import DEFAULT_BUDGET_S
from .sites import Site, SiteUsage, group_by_site, site_keys

__all__ = ["EpochResult", "LeakError", "SiteGrowth", "epoch_records", "epoch_results", "mark_epoch"]


@dataclass(frozen=True)
class SiteGrowth:
    """A site whose live bytes changed between two epoch ends (bytes, counts).

    ``holders`` are the reference paths that keep the site's new allocations
    alive (``analysis.holders.Holder``, a str with ``held_bytes`` and
    ``allocation_count``), most leaked bytes first, at most a few; empty
    when the search was off.
    """

    site: Site
    bytes_before: int
    bytes_after: int
    count_before: int
    count_after: int
    holders: list = field(default_factory=list, compare=False)

    @property
    def grown_bytes(self) -> int:
        """Live bytes added at this site since the previous epoch end."""
        return self.bytes_after - self.bytes_before

    @property
    def new_count(self) -> int:
        """Live allocations added at this site (may be negative)."""
        return self.count_after - self.count_before

    def format(self, with_stack: bool = True) -> str:
        """Readable text: growth, counts, site, and the stack if captured."""
        text = (f"+{format_bytes(self.grown_bytes)} ({self.grown_bytes} bytes; live "
                f"{format_bytes(self.bytes_before)} -> {format_bytes(self.bytes_after)}, "
                f"{self.count_before} -> {self.count_after} allocations)  {self.site.label}")
        for holder in self.holders:
            text += "\n    held by: " + holder.format()
        if with_stack and self.site.stack is not None:
            text += "\n" + "\n".join("    " + line for line in self.site.stack.format().splitlines())
        return text


class LeakError(AssertionError):
    """Raised by ``epoch(raise_on_leak=True)`` when live bytes grew past the tolerance.

    ``result`` is the EpochResult with the growing sites.
    """

    def __init__(self, result: "EpochResult", tolerance_bytes: int) -> None:
        self.result = result
        self.tolerance_bytes = tolerance_bytes
        super().__init__(result.report() + f"\n(tolerance {format_bytes(tolerance_bytes)})")


@dataclass
class EpochResult:
    """The outcome of one epoch-end check.

    ``index`` counts epoch ends from 1; ``baseline`` is True for the first
    (nothing is compared); ``leaks`` are the sites whose live bytes grew,
    largest growth first; ``live_bytes`` is what was live after the GC;
    ``gc_freed_bytes`` what that GC (the check's own) freed: memory that only
    reference cycles held, which never counts as growth unless the check
    runs with ``collect=False``; ``step`` the profiler's step at the check.
    """

    index: int
    baseline: bool
    leaks: list[SiteGrowth]
    live_bytes: int
    live_count: int
    holder_search: Any = None  # the HolderSearch behind the leaks' holders (None: not run)
    gc_freed_bytes: int = 0  # what the check's own gc.collect() freed: memory only cycles held
    step: int = 0

    @property
    def total_grown_bytes(self) -> int:
        """Sum of the growth of every growing site, in bytes."""
        return sum(g.grown_bytes for g in self.leaks)

    def report(self, max_sites: int = 10) -> str:
        """Readable text of this check (sites with their stacks)."""
        if self.baseline:
            return (f"torchmem epoch {self.index}: baseline recorded "
                    f"({format_bytes(self.live_bytes)} live in {self.live_count} allocations).")
        if not self.leaks:
            return (f"torchmem epoch {self.index}: no allocation site grew since epoch "
                    f"{self.index - 1} ({format_bytes(self.live_bytes)} live)."
                    + self._gc_note())
        lines = [f"torchmem epoch {self.index}: {len(self.leaks)} allocation site(s) grew by "
                 f"{format_bytes(self.total_grown_bytes)} since epoch {self.index - 1} "
                 f"({format_bytes(self.live_bytes)} live):"]
        for g in self.leaks[:max_sites]:
            lines.append("  " + g.format())
        if len(self.leaks) > max_sites:
            lines.append(f"  ... and {len(self.leaks) - max_sites} more site(s)")
        search = self.holder_search
        if search is not None and (search.stopped_early or search.error):
            lines.append("  (" + search.note() + ")")
        return "\n".join(lines) + self._gc_note()

    def _gc_note(self) -> str:
        if not self.gc_freed_bytes:
            return ""
        return (f"\n  (the check's own gc.collect() freed {format_bytes(self.gc_freed_bytes)} "
                "that only reference cycles held; epoch(collect=False) counts such memory "
                "and names the cycles)")

    def __str__(self) -> str:
        return self.report()


class _State:
    def __init__(self) -> None:
        self.count = 0
        self.previous: dict[int, SiteUsage] = {}
        self.results: list[EpochResult] = []
        self.max_seq = -1  # the newest allocation live at the previous check


# One state per profiler, dropped with it.
_states: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def epoch_results(profiler: Any) -> list[EpochResult]:
    """Every epoch check of ``profiler``, oldest first (empty before the first)."""
    state = _states.get(profiler)
    return list(state.results) if state is not None else []


def epoch_records(profiler: Any) -> list[dict[str, Any]]:
    """The epoch checks of ``profiler`` as plain records (``analysis.epoch_records``),
    oldest first: a loaded trace's saved ones, else the live profiler's."""
    saved = trace_records(profiler)
    return saved if saved is not None else [record_of(r) for r in epoch_results(profiler)]


def mark_epoch(profiler: Any, *, collect: bool = True, holders: bool = True,
               holders_budget_s: float = DEFAULT_BUDGET_S) -> EpochResult:
    """Ends an epoch of ``profiler`` now: GC, group live memory by site, compare
    with the last end.

    ``collect=False`` skips the ``gc.collect()`` (tensors held only by
    reference cycles then count as live, and their holders say so). That
    collection is torchmem's, not the training run's: GC monitoring does
    not record it (the tensors it frees are recorded). When a site grew,
    ``holders`` searches who keeps its new allocations alive, for at most
    ``holders_budget_s`` seconds. Returns the EpochResult; the first call of
    a profiler is the baseline.
    """
    gc_freed = 0
    if collect:
        before = profiler.get_statistics().current_usage_bytes
        collect_unreported()  # ours, not a pause of the training run's
        gc_freed = max(0, before - profiler.get_statistics().current_usage_bytes)
    profiler.poll_sources()  # GPU history events read up to now
    state = _states.get(profiler)
    if state is None:
        state = _states[profiler] = _State()
    live = profiler.live_allocations()
    now = group_by_site(profiler, live)
    state.count += 1
    baseline = state.count == 1
    grown: dict[int, SiteGrowth] = {}
    if not baseline:
        for key, usage in now.items():
            before = state.previous.get(key)
            b_bytes = before.bytes if before is not None else 0
            if usage.bytes > b_bytes:
                grown[key] = SiteGrowth(usage.site, b_bytes, usage.bytes,
                                        before.count if before is not None else 0, usage.count)
    search = None
    if grown and holders:
        by_site, search = site_holders(live, site_keys(profiler, live), grown, state.max_seq,
                                       budget_s=holders_budget_s)
        grown = {k: dataclasses.replace(g, holders=by_site.get(k, [])) for k, g in grown.items()}
    leaks = sorted(grown.values(), key=lambda g: (-g.grown_bytes, g.site.stack_id))
    result = EpochResult(state.count, baseline, leaks,
                         sum(u.bytes for u in now.values()), sum(u.count for u in now.values()),
                         search, gc_freed, profiler.current_step)
    state.previous = now
    state.max_seq = int(live["seq"].max()) if len(live) else state.max_seq
    state.results.append(result)
    # A saved trace keeps the checks (torchmem leaks, the HTML report), and a
    # view that follows a trace while it is written (torchmem live) sees them.
    store_records(profiler, state.results)
    return result
