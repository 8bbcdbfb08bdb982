"""Out-of-memory reports: what was live, where it came from, and what failed.

An out-of-memory error reaches torchmem in one of three ways:

- the CUDA plugin (or the history source's OOM observer, or
  ``profiler._record_oom`` in a test) records an OUT_OF_MEMORY event with
  the failed request and the device's free / total bytes;
- a ``torch.OutOfMemoryError`` (or a RuntimeError saying "out of memory")
  leaves an ``oom_guard()`` block or decorated function, or reaches
  ``sys.excepthook`` / ``threading.excepthook`` (installed by
  ``torchmem.enable()``);
- at exit, any OUT_OF_MEMORY event that no report covered yet (the program
  caught the error itself, e.g. a batch-size finder).

Each writes one report, as text and as self-contained HTML, into the trace
directory, and prints its path to stderr. The report holds: the failed
request, the device totals (from the OOM event and NVML), reserved vs
allocated bytes where the allocator says (the difference is memory the
allocator holds but cannot hand out: fragmentation or cache), the live
allocations grouped by site with their stacks, the last seconds of the
timeline, and the garbage collector's state.
"""

from __future__ import annotations

import functools
import gc
import html
import os
import re
import sys
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .analysis.epoch import live_by_site, top_sites
from .units import format_bytes, parse_bytes

__all__ = ["OomReport", "oom_guard", "is_oom_error", "write_report", "report_pending",
           "install", "uninstall"]

_NO_END = 2**64 - 1
_lock = threading.RLock()
_reported: "weakref.WeakKeyDictionary[Any, set[int]]" = weakref.WeakKeyDictionary()
_hook: dict[str, Any] = {}  # what install() replaced, and where reports go
_counter = 0
_SIZE_RE = re.compile(r"[Tt]ried to allocate ([0-9.]+) ?([KMGTP]i?B|bytes|B)")


@dataclass
class OomReport:
    """Where a report was written (``text_path``, ``html_path``) and its ``text``."""

    text_path: str
    html_path: str
    text: str
    data: dict[str, Any]


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an out-of-memory error from torch (any device)."""
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except Exception:
        pass
    return isinstance(exc, (RuntimeError, MemoryError)) and "out of memory" in str(exc).lower()


def _requested_from_message(message: str) -> int | None:
    m = _SIZE_RE.search(message)
    if not m:
        return None
    return parse_bytes(f"{m.group(1)} {m.group(2)}")


def _default_directory() -> str:
    return (_hook.get("directory") or os.environ.get("TORCHMEM_DIR") or "torchmem-traces")


def _allocator_view(device: int) -> dict[str, Any]:
    """Allocated vs reserved bytes on ``device`` from whoever allocates there."""
    if device < 0:
        return {}
    try:
        from . import cuda

        if cuda.is_installed():
            st = cuda.plugin_stats(device)
            return {"source": "torchmem plugin", "allocated": st["current"],
                    "reserved": st["reserved"]}
    except Exception:
        pass
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return {"source": "torch caching allocator",
                    "allocated": int(torch.cuda.memory_allocated(device)),
                    "reserved": int(torch.cuda.memory_reserved(device))}
    except Exception:
        pass
    return {}


def _timeline(prof: Any, window_s: float) -> dict[str, Any]:
    since = time.time_ns() - int(window_s * 1e9)
    rows = prof._read_rows(prof._first_seq_at_or_after_time(since), _NO_END)
    kinds = rows["kind"]
    usage = rows["total_allocated"].astype(np.int64) - rows["total_freed"].astype(np.int64)
    data = {"window_s": window_s, "events": int(len(rows)),
            "allocations": int(np.count_nonzero(kinds == 0)),
            "frees": int(np.count_nonzero(kinds == 1)),
            "bytes_allocated": int(rows["size"][kinds == 0].sum()) if len(rows) else 0,
            "points": []}
    if len(rows):
        # At most ~400 points: enough for a chart, small enough for a report.
        stride = max(1, len(rows) // 400)
        t0 = int(rows["timestamp_ns"][0])
        data["points"] = [((int(t) - t0) / 1e9, int(u)) for t, u in
                          zip(rows["timestamp_ns"][::stride], usage[::stride])]
        data["points"].append(((int(rows["timestamp_ns"][-1]) - t0) / 1e9, int(usage[-1])))
        data["last"] = [(int(r["timestamp_ns"]), int(r["kind"]), int(r["size"]),
                         prof.type_name(int(r["type_id"])), int(r["device"]))
                        for r in rows[-15:]]
    return data


def _gc_state(prof: Any) -> dict[str, Any]:
    records = prof.gc_records
    try:
        problems = [str(p) for p in prof.find_gc_problems()]
    except Exception as exc:
        problems = [f"(could not check: {exc!r})"]
    return {"enabled": gc.isenabled(), "counts": gc.get_count(), "thresholds": gc.get_threshold(),
            "collections": len(records),
            "last": [(r.generation, r.duration_ns / 1e6, r.collected, r.tensor_bytes_freed)
                     for r in records[-5:]],
            "problems": problems}


def build_report(profiler: Any, error: BaseException | None = None,
                 oom: dict[str, Any] | None = None, *, window_s: float = 5.0,
                 max_sites: int = 10) -> dict[str, Any]:
    """The report's content as a dict (sizes in bytes, times in seconds)."""
    prof = profiler
    message = str(error) if error is not None else ""
    requested = oom["requested_bytes"] if oom else _requested_from_message(message)
    device = int(oom["device"]) if oom else -1
    data: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S"), "pid": os.getpid(),
        "step": prof.current_step, "error": f"{type(error).__name__}: {message}" if error else None,
        "requested": requested, "device": device, "oom": dict(oom) if oom else None,
    }
    if oom and oom.get("stack_id"):
        data["oom_stack"] = prof.resolve_stack(int(oom["stack_id"]))
    stats = prof.get_statistics()
    data["tracked"] = {"current": stats.current_usage_bytes, "peak": stats.peak_usage_bytes,
                       "by_type": stats.usage_by_type, "by_device": stats.usage_by_device}
    data["allocator"] = _allocator_view(device)
    try:
        from .sources.nvml import query_devices

        data["nvml"] = query_devices()
    except Exception as exc:
        data["nvml"] = f"unavailable: {exc}"
    usage = live_by_site(prof)
    on_device = {k: u for k, u in usage.items() if u.site.device == device}
    data["sites_scope"] = (f"device {device}" if on_device and device >= 0 else
                           "host" if on_device else "all devices")
    data["sites"] = top_sites(on_device or usage, max_sites)
    data["live_total"] = sum(u.bytes for u in (on_device or usage).values())
    data["live_count"] = sum(u.count for u in (on_device or usage).values())
    data["timeline"] = _timeline(prof, window_s)
    data["gc"] = _gc_state(prof)
    return data


def render_text(data: dict[str, Any]) -> str:
    """The report as plain text."""
    L = [f"torchmem out-of-memory report  ({data['time']}, pid {data['pid']}, step {data['step']})"]
    req = data["requested"]
    where = "host" if data["device"] < 0 else f"device {data['device']}"
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
    t = data["tracked"]
    L.append(f"Tracked memory: {format_bytes(t['current'])} live, peak {format_bytes(t['peak'])}; "
             + ", ".join(f"{k} {format_bytes(v)}" for k, v in sorted(t["by_type"].items())))
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


def _svg(points: list[tuple[float, int]], width: int = 720, height: int = 200) -> str:
    if len(points) < 2:
        return "<p>Not enough events in the window for a chart.</p>"
    t_max = max(p[0] for p in points) or 1.0
    u_max = max(p[1] for p in points) or 1
    coords = " ".join(f"{40 + p[0] / t_max * (width - 50):.1f},{height - 20 - p[1] / u_max * (height - 30):.1f}"
                      for p in points)
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f'<rect width="100%" height="100%" fill="#fafafa"/>'
            f'<polyline fill="none" stroke="#c0392b" stroke-width="1.5" points="{coords}"/>'
            f'<text x="4" y="14" font-size="11">{html.escape(format_bytes(u_max))}</text>'
            f'<text x="4" y="{height - 4}" font-size="11">0</text>'
            f'<text x="{width - 60}" y="{height - 4}" font-size="11">{t_max:.2f} s</text></svg>')


def render_html(data: dict[str, Any], text: str) -> str:
    """The report as one self-contained HTML page (no network; every string escaped)."""
    e = html.escape
    rows = []
    for u in data["sites"]:
        stack = e(u.site.stack.format()) if u.site.stack is not None else "(no stack captured)"
        rows.append(f"<tr><td>{e(format_bytes(u.bytes))}</td><td>{u.count}</td>"
                    f"<td>{e(u.site.label)}<details><summary>stack</summary><pre>{stack}</pre>"
                    f"</details></td></tr>")
    req = data["requested"]
    head = f"{format_bytes(req)} ({req} bytes)" if req is not None else "unknown size"
    return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>torchmem OOM report</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}pre{margin:0}</style>"
            "</head><body><h1>Out of memory</h1>"
            f"<p><b>Failed request:</b> {e(head)} on "
            f"{e('host' if data['device'] < 0 else 'device %d' % data['device'])}, step {data['step']}</p>"
            f"<h2>Memory over the last {data['timeline']['window_s']:g} s</h2>"
            f"{_svg(data['timeline']['points'])}"
            f"<h2>Live allocations by site ({e(data['sites_scope'])})</h2>"
            "<table><tr><th>live</th><th>count</th><th>site</th></tr>"
            f"{''.join(rows)}</table><h2>Full text</h2><pre>{e(text)}</pre></body></html>")


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


def _unreported_oom(prof: Any, max_age_s: float | None) -> dict[str, Any] | None:
    done = _reported.setdefault(prof, set())
    now = time.time_ns()
    for o in reversed(prof.oom_events):
        if o["seq"] in done:
            return None  # the newest ones are reported; older ones belong to earlier errors
        if max_age_s is None or now - o["timestamp_ns"] <= max_age_s * 1e9:
            return o
    return None


def write_report(profiler: Any = None, error: BaseException | None = None, *,
                 oom: dict[str, Any] | None = None, directory: str | None = None,
                 window_s: float = 5.0, quiet: bool = False) -> OomReport:
    """Writes an OOM report (text and HTML) and prints its path to stderr.

    ``profiler`` defaults to the global one; ``error`` is the exception (its
    message supplies the request size when no OOM event exists); ``oom`` is
    one of ``profiler.oom_events`` (default: the newest one not reported yet
    from the last 60 s). ``window_s``: seconds of timeline included.
    """
    from . import _session

    prof = profiler if profiler is not None else _session.get_profiler()
    if prof is None:
        raise RuntimeError("torchmem is not enabled and no profiler was given")
    with _lock:
        if oom is None:
            oom = _unreported_oom(prof, 60.0)
        if oom is not None:
            _reported.setdefault(prof, set()).add(oom["seq"])
    data = build_report(prof, error, oom, window_s=window_s)
    text = render_text(data)
    text_path, html_path = _next_paths(directory or _default_directory())
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


def _handle(exc: BaseException, profiler: Any = None) -> None:
    if getattr(exc, "_torchmem_report", None) or not is_oom_error(exc):
        return
    try:
        write_report(profiler, exc)
    except Exception as err:  # a report must never replace the user's error
        print(f"torchmem: could not write the OOM report: {err!r}", file=sys.stderr)


class oom_guard:
    """Writes an OOM report when an out-of-memory error leaves the block.

    As a context manager (``with torchmem.oom_guard(): train()``) or a
    decorator (``@torchmem.oom_guard()``). The error is re-raised unchanged,
    after the report is on disk. ``profiler`` defaults to the global one.
    """

    def __init__(self, profiler: Any = None) -> None:
        self.profiler = profiler

    def __enter__(self) -> "oom_guard":
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is not None:
            _handle(exc, self.profiler)

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            with self:
                return fn(*args, **kwargs)

        return wrapper


def install(profiler: Any, directory: str | None = None) -> None:
    """Hooks sys.excepthook and threading.excepthook to report uncaught OOMs."""
    with _lock:
        _hook["directory"] = directory
        if "sys" in _hook:
            return
        prev_sys, prev_thread = sys.excepthook, threading.excepthook

        def sys_hook(tp: Any, exc: BaseException, tb: Any) -> None:
            _handle(exc)
            prev_sys(tp, exc, tb)

        def thread_hook(args: Any) -> None:
            if args.exc_value is not None:
                _handle(args.exc_value)
            prev_thread(args)

        _hook.update(sys=(prev_sys, sys_hook), thread=(prev_thread, thread_hook))
        sys.excepthook = sys_hook
        threading.excepthook = thread_hook


def uninstall() -> None:
    """Undoes install() (where nobody replaced the hooks since)."""
    with _lock:
        if "sys" in _hook:
            prev, ours = _hook.pop("sys")
            if sys.excepthook is ours:
                sys.excepthook = prev
        if "thread" in _hook:
            prev, ours = _hook.pop("thread")
            if threading.excepthook is ours:
                threading.excepthook = prev
        _hook.pop("directory", None)
