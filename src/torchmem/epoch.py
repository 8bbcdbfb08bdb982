"""The epoch leak check's public entry points: ``torchmem.epoch`` and ``torchmem.mark_epoch``.

The check itself is ``torchmem.analysis.epoch`` (see there for what it
compares); these default to the session's profiler (``torchmem.enable()``)
and never start one: without a profiler and without ``torchmem.enable()``
they raise RuntimeError, and ``epoch_results()`` is then empty.

Names that lived here before 0.2 (``Site``, ``SiteUsage``, ``live_by_site``,
``top_sites``, ``user_frame``, ``format_bytes``) moved to
``torchmem.analysis.sites`` and ``torchmem.units``; they still work from
here for one release, with a DeprecationWarning.
"""

from __future__ import annotations

import sys
from typing import Any

from . import _session
from ._deprecation import moved_names
from .analysis import epoch as _check
from .analysis.epoch import EpochResult, LeakError, SiteGrowth
from .analysis.holders import DEFAULT_BUDGET_S

__all__ = ["EpochResult", "LeakError", "SiteGrowth", "epoch", "epoch_results", "mark_epoch"]


def _profiler(profiler: Any) -> Any:
    if profiler is not None:
        return profiler
    prof = _session.get_profiler()
    if prof is None:
        raise RuntimeError("torchmem is not enabled: call torchmem.enable() first, or pass "
                           "the profiler to check (profiler=...)")
    return prof


def epoch_results(profiler: Any = None) -> list[EpochResult]:
    """Every epoch check of ``profiler`` (default: the session's), oldest first.

    A query: with no profiler and no session it is empty (it never enables
    torchmem).
    """
    prof = profiler if profiler is not None else _session.get_profiler()
    return _check.epoch_results(prof) if prof is not None else []


def mark_epoch(profiler: Any = None, *, collect: bool = True, holders: bool = True,
               holders_budget_s: float = DEFAULT_BUDGET_S) -> EpochResult:
    """Ends an epoch now: GC, group live memory by site, compare with the last end,
    and for the sites that grew find who holds them (``holders``, at most
    ``holders_budget_s`` seconds).

    ``profiler`` defaults to the session's (``torchmem.enable()``); without
    one this raises RuntimeError. See ``torchmem.analysis.epoch.mark_epoch``.
    """
    return _check.mark_epoch(_profiler(profiler), collect=collect, holders=holders,
                             holders_budget_s=holders_budget_s)


class epoch:
    """Context manager around one epoch: ``with torchmem.epoch() as e: ...``.

    On exit (when the body did not raise) it runs ``mark_epoch``; then
    ``e.leaks`` lists the sites whose live bytes grew since the previous
    epoch (empty for the first, the baseline), ``e.report()`` describes
    them, and with ``raise_on_leak=True`` a total growth above
    ``tolerance_bytes`` raises ``LeakError``.

    Args:
        raise_on_leak: raise LeakError when the sites grew by more than
            ``tolerance_bytes`` in total.
        tolerance_bytes: growth, in bytes, accepted without raising.
        profiler: the profiler to check (default: the session's; without
            one, entering raises RuntimeError).
        stacks: turn the profiler's stack capture on, so leaks name their
            source line (it stays on afterwards).
        verbose: print the report to stderr when a site grew.
        holders: when a site grew, find who holds its new allocations
            (``SiteGrowth.holders``); False skips the search.
        holders_budget_s: the most wall time, in seconds, the holder
            search may take (it stops and says so).
        collect: run ``gc.collect()`` before measuring (see mark_epoch).
    """

    def __init__(self, raise_on_leak: bool = False, tolerance_bytes: int = 0,
                 profiler: Any = None, *, stacks: bool = True, verbose: bool = False,
                 holders: bool = True, holders_budget_s: float = DEFAULT_BUDGET_S,
                 collect: bool = True) -> None:
        if not isinstance(tolerance_bytes, int) or tolerance_bytes < 0:
            raise ValueError(f"tolerance_bytes must be an int >= 0, got {tolerance_bytes!r}")
        if (isinstance(holders_budget_s, bool) or not isinstance(holders_budget_s, (int, float))
                or not holders_budget_s >= 0):
            raise ValueError(f"holders_budget_s must be seconds >= 0, got {holders_budget_s!r}")
        self.holders = holders
        self.holders_budget_s = holders_budget_s
        self.collect = collect
        self.raise_on_leak = raise_on_leak
        self.tolerance_bytes = tolerance_bytes
        self.profiler = profiler
        self.stacks = stacks
        self.verbose = verbose
        self.result: EpochResult | None = None

    def __enter__(self) -> "epoch":
        self.profiler = _profiler(self.profiler)
        if self.stacks and not self.profiler.capture_stack_traces:
            self.profiler.capture_stack_traces = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            return  # the epoch did not finish; its memory says nothing about leaks
        self.result = mark_epoch(self.profiler, collect=self.collect, holders=self.holders,
                                 holders_budget_s=self.holders_budget_s)
        if self.verbose and self.result.leaks:
            print(self.result.report(), file=sys.stderr)
        if self.raise_on_leak and self.result.total_grown_bytes > self.tolerance_bytes:
            raise LeakError(self.result, self.tolerance_bytes)

    @property
    def leaks(self) -> list[SiteGrowth]:
        """Growing sites, largest first (empty before exit and for the baseline)."""
        return self.result.leaks if self.result is not None else []

    @property
    def index(self) -> int:
        """Which epoch end this was (1 = the baseline); 0 before exit."""
        return self.result.index if self.result is not None else 0

    def report(self, max_sites: int = 10) -> str:
        """Readable text of the check (see EpochResult.report)."""
        if self.result is None:
            return "torchmem epoch: not finished"
        return self.result.report(max_sites)


__getattr__ = moved_names(__name__, {
    "Site": "torchmem.analysis.sites:Site",
    "SiteUsage": "torchmem.analysis.sites:SiteUsage",
    "live_by_site": "torchmem.analysis.sites:group_by_site",
    "top_sites": "torchmem.analysis.sites:top_sites",
    "user_frame": "torchmem.analysis.sites:user_frame",
    "format_bytes": "torchmem.units:format_bytes",
})
