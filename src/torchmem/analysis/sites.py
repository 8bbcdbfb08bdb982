"""The allocation site: the one definition every report uses.

A site is where the user's code asked for memory: the innermost frame of the
allocation's stack that is outside torch and outside torchmem. An
allocation made inside ``nn.Linear.forward`` belongs to the user's
``model(x)`` line, not to torch's ``linear.py``; torchmem's own frames are
never a site (the recorder already skips most of them). When every frame is
torch's the innermost frame is the site (there is nothing better to name);
without a stack there is no site line, only the type and device.

``site_name(stack)`` is the text every report prints for it,
``"FILE:LINE in FUNCTION"``; ``Site`` adds the allocation type and device
(the epoch check and the summary keep those apart); ``site_keys``,
``group_by_site`` and ``bytes_by_site_name`` group event or live rows by site,
so allocations of one line reached through different stacks (two Linear
layers of one ``model(x)`` call) are one site in every report.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from .._events import stack_key_of, sum_by_key
from .._types import StackTrace

__all__ = [
    "NO_STACK",
    "Site",
    "SiteUsage",
    "bytes_by_site_name",
    "device_label",
    "group_by_site",
    "group_stack_sums",
    "is_library_frame",
    "merge_by_label",
    "site_keys",
    "site_name",
    "top_sites",
    "user_frame",
]

#: What a report prints for an allocation recorded without a stack.
NO_STACK = "(no stack captured)"

_TORCHMEM_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# A trace recorded elsewhere has another installation's paths: an installed
# torch or torchmem is recognised by its folder under site- or dist-packages.
_INSTALLED = re.compile(r"[/\\](site|dist)-packages[/\\](torch|torchmem)[/\\]")
_torch_dir: str | None = None


def _torch_prefix() -> str:
    global _torch_dir
    if _torch_dir is None:
        # Where torch is installed, without importing it (a second or more
        # for a report on a saved trace that never needs torch itself).
        torch = sys.modules.get("torch")
        origin = getattr(torch, "__file__", None)
        if origin is None:
            try:
                spec = importlib.util.find_spec("torch")
                origin = spec.origin if spec is not None else None
            except (ImportError, ValueError):  # pragma: no cover - torch is a dependency
                origin = None
        _torch_dir = (os.path.dirname(os.path.abspath(origin)) + os.sep if origin
                      else os.sep + "nonexistent" + os.sep)
    return _torch_dir


def is_library_frame(filename: str) -> bool:
    """Whether ``filename`` is torch's or torchmem's code (never a site)."""
    return (filename.startswith(_torch_prefix()) or filename.startswith(_TORCHMEM_DIR)
            or _INSTALLED.search(filename) is not None)


def user_frame(stack: StackTrace | None) -> tuple[str, int, str] | None:
    """The site frame of ``stack``: its innermost ``(file, line, function)``
    outside torch and torchmem; the innermost frame when all are theirs;
    None without a stack."""
    if stack is None or not stack.frames:
        return None
    for frame in stack.frames:
        if not is_library_frame(frame[0]):
            return frame
    return stack.frames[0]


def site_name(stack: StackTrace | None) -> str:
    """The site as every report prints it: ``"FILE:LINE in FUNCTION"``
    (``NO_STACK`` without a stack)."""
    frame = user_frame(stack)
    if frame is None:
        return NO_STACK
    return f"{frame[0]}:{frame[1]} in {frame[2]}"


def device_label(device: int | None) -> str:
    """How reports name a device: "host" (-1), "device N", or "an unknown device" (None)."""
    if device is None:
        return "an unknown device"
    return "host" if device < 0 else f"device {device}"


@dataclass(frozen=True)
class Site:
    """Where allocations come from: a stack (id 0: none) on a type and device."""

    stack_id: int
    allocation_type: str
    device: int
    stack: StackTrace | None = field(default=None, compare=False)

    @property
    def frame(self) -> tuple[str, int, str] | None:
        """The site frame (``user_frame`` of the stack)."""
        return user_frame(self.stack)

    @property
    def name(self) -> str:
        """``"FILE:LINE in FUNCTION"`` (``site_name``)."""
        return site_name(self.stack)

    @property
    def label(self) -> str:
        """One line: the site name with its type and device, or type and device alone."""
        where = device_label(self.device)
        if self.user_line is None:
            return f"{self.allocation_type} on {where} {NO_STACK}"
        return f"{self.user_line} [{self.allocation_type}, {where}]"

    @property
    def user_line(self) -> str | None:
        """The site name, or None without a stack."""
        return None if self.frame is None else self.name


@dataclass(frozen=True)
class SiteUsage:
    """``bytes`` in ``count`` allocations made at ``site``."""

    site: Site
    bytes: int
    count: int


def _stack_keys(rows: np.ndarray) -> np.ndarray:
    # One uint64 per row: stack id, type id and device packed together
    # (``_events.stack_key_of``), so one np.unique finds the distinct stacks.
    return stack_key_of(rows)


def _unpack_key(key: int) -> tuple[int, int, int]:
    return key >> 32, (key >> 16) & 0xFFFF, (key & 0xFFFF) - 1


# (site frame, type name, device) -> key, for the process: a site's key is
# the same in every call, for every profiler (live or loaded) that names the
# same line, so the epoch check can compare one check's sites with the last.
_site_ids: dict[tuple[Any, str, int], int] = {}


def _sites_of(profiler: Any, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, list[Site]]:
    # The rows' site keys, and per distinct stack its row positions' inverse
    # index and its Site, so group_by_site can name each line by one stack.
    uniq, inverse = np.unique(_stack_keys(rows), return_inverse=True)
    ids, stack_sites = _name_stacks(profiler, uniq)
    return ids[inverse.reshape(-1)], inverse.reshape(-1), stack_sites


def _name_stacks(profiler: Any, stack_keys: np.ndarray) -> tuple[np.ndarray, list[Site]]:
    # The site key and the Site of each distinct stack key.
    stack_sites: list[Site] = []
    ids = np.empty(len(stack_keys), dtype=np.uint64)
    for i, key in enumerate(stack_keys.tolist()):
        stack_id, type_id, device = _unpack_key(key)
        site = Site(stack_id, profiler.type_name(type_id), device,
                    profiler.resolve_stack(stack_id) if stack_id else None)
        stack_sites.append(site)
        ident = (site.frame, site.allocation_type, device)
        ids[i] = _site_ids.setdefault(ident, len(_site_ids))
    return ids, stack_sites


def site_keys(profiler: Any, rows: np.ndarray) -> np.ndarray:
    """One opaque uint64 per row (event or live rows of ``profiler``): its site
    (the user's line, with the type and device). Rows of one line reached
    through different stacks have one key; keys are stable across calls."""
    if not len(rows):
        return np.zeros(0, dtype=np.uint64)
    return _sites_of(profiler, rows)[0]


def group_by_site(profiler: Any, rows: np.ndarray | None = None) -> dict[int, SiteUsage]:
    """Rows of ``profiler`` grouped by site (line, type, device): key -> SiteUsage.

    ``rows`` are LIVE_DTYPE or EVENT_DTYPE rows (default: the profiler's
    live allocations); keys are ``site_keys``. Each site's ``stack`` is the
    one of its stacks that holds the most bytes (shown with the site).
    """
    if rows is None:
        rows = profiler.live_allocations()
    if not len(rows):
        return {}
    return group_stack_sums(profiler, *sum_by_key(_stack_keys(rows), rows["size"]))


def group_stack_sums(profiler: Any, stack_keys: np.ndarray, stack_bytes: np.ndarray,
                     stack_counts: np.ndarray) -> dict[int, SiteUsage]:
    """Per-stack sums grouped by site as ``group_by_site`` groups rows: from
    arrays (distinct stack keys ascending, bytes, counts), as ``sum_by_key``
    or a profiler's ``allocation_totals_by_stack`` give them; one object per
    stack and per site, none per allocation."""
    if not len(stack_keys):
        return {}
    keys, stack_sites = _name_stacks(profiler, stack_keys)
    uniq, inverse = np.unique(keys, return_inverse=True)
    # Exact byte sums: float64 is exact below 2**53 bytes (8 PiB), far above any device.
    site_bytes = np.bincount(inverse, weights=stack_bytes.astype(np.float64), minlength=len(uniq))
    counts = np.bincount(inverse, weights=stack_counts.astype(np.float64), minlength=len(uniq))
    best: dict[int, int] = {}  # site key -> its stack holding the most bytes
    nbytes = stack_bytes.tolist()
    for i, key in enumerate(keys.tolist()):
        j = best.get(key)
        if j is None or (nbytes[i], -stack_sites[i].stack_id) > (
                nbytes[j], -stack_sites[j].stack_id):
            best[key] = i
    return {key: SiteUsage(stack_sites[best[key]], int(b), int(c))
            for key, b, c in zip(uniq.tolist(), site_bytes.tolist(), counts.tolist())}


def top_sites(usage: dict[int, SiteUsage], n: int = 10) -> list[SiteUsage]:
    """The ``n`` sites with the most bytes, largest first."""
    return sorted(usage.values(), key=lambda u: (-u.bytes, u.site.stack_id))[:n]


def merge_by_label(usages: Iterable[SiteUsage]) -> list[tuple[str, int, int]]:
    """(label, bytes, count) per ``Site.label``, largest first: stacks that differ
    only inside torch (the two Linear layers of one ``model(x)`` call) are one
    line of the user's code."""
    merged: dict[str, list[int]] = {}
    for u in usages:
        m = merged.setdefault(u.site.label, [0, 0])
        m[0] += u.bytes
        m[1] += u.count
    return sorted(((k, v[0], v[1]) for k, v in merged.items()), key=lambda x: (-x[1], x[0]))


def bytes_by_site_name(profiler: Any, rows: np.ndarray | None = None, *,
                       totals: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
                       ) -> dict[str, tuple[int, int, int]]:
    """``{site_name: (bytes, count, stack_id)}`` over ``rows`` (default: the live
    allocations) or per-stack ``totals`` (``group_stack_sums``' arrays), every
    type and device together; ``stack_id`` is one stack of the site (the
    largest), for showing it."""
    usage = (group_stack_sums(profiler, *totals) if totals is not None
             else group_by_site(profiler, rows))
    out: dict[str, tuple[int, int, int]] = {}
    for u in top_sites(usage, n=1 << 62):
        name = u.site.name
        old = out.get(name)
        out[name] = (u.bytes, u.count, u.site.stack_id) if old is None else (
            old[0] + u.bytes, old[1] + u.count, old[2])
    return out
