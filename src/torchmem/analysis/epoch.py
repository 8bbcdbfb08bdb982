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

A *site* is the interned Python stack of the allocation (with its allocation
type and device). Without stacks (``capture_stack_traces`` off) the site
falls back to the allocation type and device, which still says *that* memory
grows but not *where*; ``torchmem.epoch()`` therefore turns stack capture on
for the profiler it checks (``stacks=False`` keeps it off).
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._types import StackTrace
from ..units import format_bytes
from ..sources.gc_monitor import collect_unreported

__all__ = [
    "EpochResult",
    "LeakError",
    "Site",
    "SiteGrowth",
    "SiteUsage",
    "epoch",
    "format_bytes",
    "live_by_site",
    "mark_epoch",
    "user_frame",
]

_TORCH_DIR: str | None = None


def _torch_dir() -> str:
    global _TORCH_DIR
    if _TORCH_DIR is None:
        try:
            import torch

            _TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
        except Exception:  # pragma: no cover - torch is a dependency
            _TORCH_DIR = os.sep + "nonexistent" + os.sep
    return _TORCH_DIR


def user_frame(stack: StackTrace | None) -> tuple[str, int, str] | None:
    """The innermost frame of ``stack`` outside torch itself (the user's line).

    An allocation made inside ``nn.Linear.forward`` is the user's
    ``model(x)`` call; that is the line worth printing. Falls back to the
    innermost frame when every frame is torch's.
    """
    if stack is None or not stack.frames:
        return None
    prefix = _torch_dir()
    for frame in stack.frames:
        if not frame[0].startswith(prefix):
            return frame
    return stack.frames[0]


@dataclass(frozen=True)
class Site:
    """Where allocations come from: a stack (id 0: none) on a type and device."""

    stack_id: int
    allocation_type: str
    device: int
    stack: StackTrace | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """One line: ``file:line in function`` of the user's frame, or type/device."""
        frame = user_frame(self.stack)
        where = "host" if self.device < 0 else f"device {self.device}"
        if frame is None:
            return f"{self.allocation_type} on {where} (no stack captured)"
        return f"{frame[0]}:{frame[1]} in {frame[2]} [{self.allocation_type}, {where}]"


@dataclass(frozen=True)
class SiteUsage:
    """Live ``bytes`` in ``count`` allocations made at ``site``."""

    site: Site
    bytes: int
    count: int


@dataclass(frozen=True)
class SiteGrowth:
    """A site whose live bytes changed between two epoch ends (bytes, counts)."""

    site: Site
    bytes_before: int
    bytes_after: int
    count_before: int
    count_after: int

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
        if with_stack and self.site.stack is not None:
            text += "\n" + "\n".join("    " + line for line in self.site.stack.format().splitlines())
        return text


def _site_keys(live: np.ndarray) -> np.ndarray:
    # One uint64 per row: stack id, type id and device packed together, so a
    # single np.unique groups by all three.
    return ((live["stack_id"].astype(np.uint64) << np.uint64(32))
            | (live["type_id"].astype(np.uint64) << np.uint64(16))
            | ((live["device"].astype(np.int64) + 1).astype(np.uint64) & np.uint64(0xFFFF)))


def _unpack_key(key: int) -> tuple[int, int, int]:
    return key >> 32, (key >> 16) & 0xFFFF, (key & 0xFFFF) - 1


def live_by_site(profiler: Any, live: np.ndarray | None = None) -> dict[int, SiteUsage]:
    """Live allocations of ``profiler`` grouped by site: key -> SiteUsage.

    ``live`` is a LIVE_DTYPE array (default: ``profiler.live_allocations()``).
    Keys are opaque ints, equal for the same site across calls.
    """
    if live is None:
        live = profiler.live_allocations()
    if not len(live):
        return {}
    keys = _site_keys(live)
    uniq, inverse = np.unique(keys, return_inverse=True)
    sizes = np.bincount(inverse, weights=live["size"].astype(np.float64), minlength=len(uniq))
    # Exact byte sums: float64 is exact below 2**53 bytes (8 PiB), far above any device.
    counts = np.bincount(inverse, minlength=len(uniq))
    out: dict[int, SiteUsage] = {}
    for key, nbytes, count in zip(uniq.tolist(), sizes.tolist(), counts.tolist()):
        stack_id, type_id, device = _unpack_key(key)
        site = Site(stack_id, profiler.type_name(type_id), device,
                    profiler.resolve_stack(stack_id) if stack_id else None)
        out[key] = SiteUsage(site, int(nbytes), int(count))
    return out


def top_sites(usage: dict[int, SiteUsage], n: int = 10) -> list[SiteUsage]:
    """The ``n`` sites with the most bytes, largest first."""
    return sorted(usage.values(), key=lambda u: (-u.bytes, u.site.stack_id))[:n]


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
    largest growth first; ``live_bytes`` is what was live after the GC.
    """

    index: int
    baseline: bool
    leaks: list[SiteGrowth]
    live_bytes: int
    live_count: int

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
                    f"{self.index - 1} ({format_bytes(self.live_bytes)} live).")
        lines = [f"torchmem epoch {self.index}: {len(self.leaks)} allocation site(s) grew by "
                 f"{format_bytes(self.total_grown_bytes)} since epoch {self.index - 1} "
                 f"({format_bytes(self.live_bytes)} live):"]
        for g in self.leaks[:max_sites]:
            lines.append("  " + g.format())
        if len(self.leaks) > max_sites:
            lines.append(f"  ... and {len(self.leaks) - max_sites} more site(s)")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.report()


class _State:
    def __init__(self) -> None:
        self.count = 0
        self.previous: dict[int, SiteUsage] = {}
        self.results: list[EpochResult] = []


# One state per profiler, dropped with it.
_states: "weakref.WeakKeyDictionary[Any, _State]" = weakref.WeakKeyDictionary()


def _resolve_profiler(profiler: Any) -> Any:
    if profiler is not None:
        return profiler
    from .. import _session

    prof = _session.get_profiler()
    if prof is None:
        prof = _session.enable()
    return prof


def epoch_results(profiler: Any = None) -> list[EpochResult]:
    """Every epoch check of ``profiler`` (default: the global one), oldest first."""
    prof = profiler if profiler is not None else _resolve_profiler(None)
    state = _states.get(prof)
    return list(state.results) if state is not None else []


def mark_epoch(profiler: Any = None, *, collect: bool = True) -> EpochResult:
    """Ends an epoch now: GC, group live memory by site, compare with the last end.

    ``profiler`` defaults to the process-wide one (``torchmem.enable()``).
    ``collect=False`` skips the ``gc.collect()`` (tensors held only by
    reference cycles then count as live). That collection is torchmem's, not
    the training run's: GC monitoring does not record it (the tensors it
    frees are recorded). Returns the EpochResult; the first call of a
    profiler is the baseline.
    """
    prof = _resolve_profiler(profiler)
    if collect:
        collect_unreported()  # ours, not a pause of the training run's
    from .. import _session

    _session._poll_sources(prof)  # GPU history events read up to now
    state = _states.get(prof)
    if state is None:
        state = _states[prof] = _State()
    now = live_by_site(prof)
    state.count += 1
    baseline = state.count == 1
    leaks: list[SiteGrowth] = []
    if not baseline:
        for key, usage in now.items():
            before = state.previous.get(key)
            b_bytes = before.bytes if before is not None else 0
            if usage.bytes > b_bytes:
                leaks.append(SiteGrowth(usage.site, b_bytes, usage.bytes,
                                        before.count if before is not None else 0, usage.count))
        leaks.sort(key=lambda g: (-g.grown_bytes, g.site.stack_id))
    result = EpochResult(state.count, baseline, leaks,
                         sum(u.bytes for u in now.values()), sum(u.count for u in now.values()))
    state.previous = now
    state.results.append(result)
    return result


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
        profiler: the profiler to check (default: the global one, enabled
            if needed).
        stacks: turn the profiler's stack capture on, so leaks name their
            source line (it stays on afterwards).
        verbose: print the report to stderr when a site grew.
    """

    def __init__(self, raise_on_leak: bool = False, tolerance_bytes: int = 0,
                 profiler: Any = None, *, stacks: bool = True, verbose: bool = False) -> None:
        if not isinstance(tolerance_bytes, int) or tolerance_bytes < 0:
            raise ValueError(f"tolerance_bytes must be an int >= 0, got {tolerance_bytes!r}")
        self.raise_on_leak = raise_on_leak
        self.tolerance_bytes = tolerance_bytes
        self.profiler = profiler
        self.stacks = stacks
        self.verbose = verbose
        self.result: EpochResult | None = None

    def __enter__(self) -> "epoch":
        self.profiler = _resolve_profiler(self.profiler)
        if self.stacks and not self.profiler.capture_stack_traces:
            self.profiler.capture_stack_traces = True
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            return  # the epoch did not finish; its memory says nothing about leaks
        self.result = mark_epoch(self.profiler)
        if self.verbose and self.result.leaks:
            import sys

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
