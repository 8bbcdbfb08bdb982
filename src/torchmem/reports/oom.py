"""Out-of-memory reports as text, and the files each report is written to.

``write_report(profiler, ...)`` builds the report (``torchmem.analysis.oom``),
renders it as text (``render_text``) and HTML
(``torchmem.export.oom_html``), writes both (mode 0600) and prints the
path. ``report_pending`` reports OUT_OF_MEMORY events no report covered yet.
The hooks that call these when an error happens are ``torchmem.oom``'s.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from .._types import OomEvent
from ..analysis.oom import build_report
from ..analysis.sites import device_label
from ..export.oom_html import render_html
from ..units import format_bytes

__all__ = ["OomReport", "default_directory", "render_text", "report_pending", "write_report"]

_lock = threading.RLock()
_reported: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()
_counter = 0


@dataclass
class OomReport:
    """Where a report was written (``text_path``, ``html_path``), its ``text`` and ``data``."""

    text_path: str
    html_path: str
    text: str
    data: dict[str, Any]


def default_directory() -> str:
    """Where reports go without a directory: $TORCHMEM_DIR, else ./torchmem-traces."""
    return os.environ.get("TORCHMEM_DIR") or "torchmem-traces"


def render_text(data: dict[str, Any]) -> str:
    """The report as plain text."""
    L = [f"torchmem out-of-memory report  ({data['time']}, pid {data['pid']}, step {data['step']})"]
    req = data["requested"]
    where = device_label(data["device"])
    L.append(f"Failed request: {format_bytes(req) + f' ({req} bytes)' if req is not None else 'unknown size'} on {where}")
    if data["error"]:
        L.append(f"Error: {data['error'].splitlines()[0][:500]}")
    oom = data["oom"]
    if oom:
        totals = (f"{format_bytes(oom['device_free_bytes'])} free of "
                  f"{format_bytes(oom['device_total_bytes'])}" if oom["device_total_bytes"]
                  else "free/total unknown")
        L.append(f"Device at failure: {totals}; {format_bytes(oom['live_bytes'])} live on it in "
                 f"torchmem's records; stream {oom['stream']:#x}")
    if data.get("oom_stack"):
        L.append("Requested from:\n" + data["oom_stack"].format())
    a = data["allocator"]
    if a:
        L.append(f"Allocator ({a['source']}): {format_bytes(a['allocated'])} allocated, "
                 f"{format_bytes(a['reserved'])} reserved; {format_bytes(a['reserved'] - a['allocated'])}"
                 " held but not allocated (cache / fragmentation)")
    seg = data.get("segments")
    if seg:
        when = "at the failure" if seg["at_failure"] else "now"
        line = (f"Segments {when} (torch's caching allocator, traced): {seg['segments']} "
                f"holding {format_bytes(seg['reserved'])}, {format_bytes(seg['allocated'])} "
                f"allocated; largest free block {format_bytes(seg['largest_free'])} of "
                f"{format_bytes(seg['free'])} free")
        if data.get("requested"):
            line += (f"; {format_bytes(seg['fragmented'])} of it in ranges smaller than the "
                     "request (fragmentation)")
        L.append(line)
    t = data["tracked"]
    L.append(f"Tracked memory: {format_bytes(t['current'])} live, peak {format_bytes(t['peak'])}; "
             + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(t["by_type"].items())))
    L.extend(_attribution_lines(data.get("attribution") or {}))
    nv = data["nvml"]
    if isinstance(nv, str):
        L.append(f"NVML: {nv}")
    else:
        for d in nv:
            proc = "" if d.process_used_bytes is None else f", this process {format_bytes(d.process_used_bytes)}"
            L.append(f"NVML device {d.index} ({d.name}): {format_bytes(d.used_bytes)} used, "
                     f"{format_bytes(d.free_bytes)} free of {format_bytes(d.total_bytes)}{proc}")
    L.append(f"\nLive allocations on {data['sites_scope']}: {format_bytes(data['live_total'])} "
             f"in {data['live_count']} allocations; top sites:")
    for u in data["sites"]:
        L.append(f"  {format_bytes(u.bytes):>12} in {u.count:>6} allocations  {u.site.label}")
        if u.site.stack is not None:
            L.extend("      " + line for line in u.site.stack.format().splitlines())
    tl = data["timeline"]
    L.append(f"\nLast {tl['window_s']:g} s: {tl['allocations']} allocations "
             f"({format_bytes(tl['bytes_allocated'])}), {tl['frees']} frees")
    for ts, kind, size, typ, dev in tl.get("last", []):
        name = {0: "alloc", 1: "free", 2: "realloc", 6: "OOM"}.get(kind, "marker")
        L.append(f"  {time.strftime('%H:%M:%S', time.localtime(ts / 1e9))}.{ts % 10**9 // 10**6:03d} "
                 f"{name:<7} {format_bytes(size):>12} {typ} dev {dev}")
    g = data["gc"]
    L.append(f"\nGC: {'enabled' if g['enabled'] else 'DISABLED'}, counts {g['counts']}, thresholds "
             f"{g['thresholds']}, {g['collections']} collections seen")
    for gen, ms, collected, freed in g["last"]:
        L.append(f"  gen {gen}: {ms:.2f} ms, {collected} objects, {format_bytes(freed)} of tensors freed")
    for p in g["problems"]:
        L.append(f"  problem: {p}")
    return "\n".join(L) + "\n"


def _attribution_lines(a: dict[str, Any]) -> list[str]:
    """What was live at the failure by category and module, and who asked."""
    if not a or "error" in a:
        return [f"What was live at the failure: unknown ({a['error']})"] if a else []
    total = sum(a["by_category"].values())
    if not total:
        return []
    who = (f"{a['running_phase']} of {a['running_module']}" if a["running_module"]
           else a["running_phase"])
    share = lambda d: ", ".join(f"{k} {format_bytes(v)} ({100 * v / total:.0f}%)"  # noqa: E731
                                for k, v in list(d.items())[:6])
    return [f"At the failure ({who} was running), live: {share(a['by_category'])}",
            f"  by module: {share(a['by_module'])}"]


def _next_paths(directory: str) -> tuple[str, str]:
    global _counter
    with _lock:
        _counter += 1
        n = _counter
    os.makedirs(directory, exist_ok=True)
    rank = os.environ.get("RANK")
    base = os.path.join(directory, f"oom-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                        f"{'-rank' + rank if rank else ''}-{n}")
    return base + ".txt", base + ".html"


def _write_private(path: str, text: str) -> None:
    # 0600: reports hold source paths, like traces.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def _unreported_oom(prof: Any, max_age_s: float | None) -> OomEvent | None:
    done = _reported.setdefault(prof, set())
    now = time.time_ns()
    for o in reversed(prof.oom_events):
        if o.seq in done:
            return None  # the newest ones are reported; older ones belong to earlier errors
        if max_age_s is None or now - o.timestamp_ns <= max_age_s * 1e9:
            return o
    return None


def write_report(profiler: Any, error: BaseException | None = None, *,
                 oom: OomEvent | None = None, directory: str | None = None,
                 window_s: float = 5.0, quiet: bool = False) -> OomReport:
    """Writes an OOM report of ``profiler`` (text and HTML) and prints its path to stderr.

    ``error`` is the exception (its message supplies the request size when
    no OOM event exists); ``oom`` is one of ``profiler.oom_events`` (default:
    the newest one not reported yet from the last 60 s). ``directory``
    defaults to $TORCHMEM_DIR or ./torchmem-traces; ``window_s``: seconds of
    timeline included.
    """
    prof = profiler
    with _lock:
        if oom is None:
            oom = _unreported_oom(prof, 60.0)
        if oom is not None:
            _reported.setdefault(prof, set()).add(oom.seq)
    data = build_report(prof, error, oom, window_s=window_s)
    text = render_text(data)
    text_path, html_path = _next_paths(directory or default_directory())
    _write_private(text_path, text)
    _write_private(html_path, render_html(data, text))
    if error is not None:
        try:
            error._torchmem_report = text_path  # one report per error, however it travels
        except Exception:
            pass
    if not quiet:
        print(f"torchmem: out-of-memory report written to {text_path} (HTML: {html_path})",
              file=sys.stderr)
    return OomReport(text_path, html_path, text, data)


def report_pending(profiler: Any, directory: str | None = None) -> list[OomReport]:
    """Reports every OUT_OF_MEMORY event of ``profiler`` no report covered yet (at exit)."""
    out = []
    while True:
        with _lock:
            oom = _unreported_oom(profiler, None)
        if oom is None:
            return out
        out.append(write_report(profiler, oom=oom, directory=directory))


