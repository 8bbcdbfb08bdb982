"""A self-contained HTML report: one file, no network, every string escaped.

Sections: memory over time (every allocation a band, the bytes by category,
the steps: click one for its peak's breakdown; zoom and pan; hover for
sizes, lifetimes and stacks: export._interactive, drawn by Bokeh with its
JavaScript inline), the peak's breakdown, the table by module, what was live
at the peak by stack (a flame graph), top allocation sites, potential leaks,
GC pauses, snapshots with NVML device totals, out-of-memory errors, the run
summary and metadata.
"""

from __future__ import annotations

import datetime
import json
import os
from html import escape
from typing import Any, Iterable, Sequence

import numpy as np

from ..analysis.epoch import epoch_records
from ..analysis.epoch_records import METADATA_KEY as EPOCH_KEY, int_field
from ..analysis.sites import bytes_by_site_name, site_name
from ._common import Progress
from ._timeline import Timeline
from ..units import format_bytes
from ._attribution_html import module_table_html, peak_html

__all__ = ["to_html", "export_html"]

_CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:20px;color:#222;
background:#ffffff}
h1{font-size:22px;margin:0 0 8px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.num{text-align:right;
font-variant-numeric:tabular-nums}code,pre{font-family:Menlo,Consolas,monospace;font-size:12px}
pre{margin:4px 0;white-space:pre-wrap}.legend{margin-right:14px;font-size:13px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:middle}
.muted{color:#777}
"""


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: set[int] = frozenset()
           ) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            # Cells given as ("html", text) are pre-escaped fragments built here.
            text = v[1] if isinstance(v, tuple) and v and v[0] == "html" else _e(v)
            cells.append(f'<td class="num">{text}</td>' if i in numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    if not body:
        return '<p class="muted">None.</p>'
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _stack_html(profiler: Any, stack_id: int) -> tuple[str, str]:
    trace = profiler.resolve_stack(int(stack_id)) if stack_id else None
    if trace is None or not trace.frames:
        return ("html", '<span class="muted">no stack captured</span>')
    return ("html", f"<details><summary><code>{_e(site_name(trace))}</code></summary>"
                    f"<pre>{_e(trace.format())}</pre></details>")


def _time(ns: int) -> str:
    return datetime.datetime.fromtimestamp(ns / 1e9).isoformat(sep=" ", timespec="milliseconds")


def _sites(profiler: Any, timeline: Timeline, top: int) -> str:
    if not len(timeline.site_sums[0]):
        return _table([], [])
    by_site = bytes_by_site_name(profiler, totals=timeline.site_sums)
    live = bytes_by_site_name(profiler)
    rows = sorted(by_site.items(), key=lambda kv: (-kv[1][0], kv[0]))[:top]
    return _table(["Site (your line)", "Allocated", "Allocations", "Live at end"],
                  [(_stack_html(profiler, sid), format_bytes(b, 1), f"{c:,}",
                    format_bytes(live.get(site, (0, 0))[0], 1)) for site, (b, c, sid) in rows],
                  numeric={1, 2, 3})


def _epoch_checks(profiler: Any) -> str:
    # The last epoch check that found growth: its sites and who held them.
    records = epoch_records(profiler)
    grew = [r for r in records if isinstance(r.get("sites"), list) and r["sites"]]
    if not grew:
        return (f'<p class="muted">{len(records)} epoch check(s), none found growth.</p>'
                if records else "")
    last = grew[-1]
    rows = []
    for site in last["sites"]:
        if not isinstance(site, dict):
            continue
        held = "".join(
            f"<div><code>{_e(h.get('path'))}</code> "
            f'<span class="muted">({_e(h.get("allocation_count"))} allocations, '
            f"{_e(format_bytes(int_field(h.get('held_bytes'))))})</span></div>"
            for h in site.get("holders") or [] if isinstance(h, dict))
        rows.append((("html", f"<code>{_e(site.get('site'))}</code>"),
                     format_bytes(int_field(site.get("grown_bytes"))),
                     f"{format_bytes(int_field(site.get('bytes_before')))} -> "
                     f"{format_bytes(int_field(site.get('bytes_after')))}",
                     ("html", held or '<span class="muted">not searched</span>')))
    search = last.get("holder_search")
    note = (f'<p class="muted">{_e(search.get("note"))}</p>'
            if isinstance(search, dict) and (search.get("stopped_early") or search.get("error"))
            else "")
    return (f"<p>Epoch check {_e(last.get('index'))} (the last of {len(grew)} of {len(records)} "
            f"that found growth): {_e(last.get('site_count'))} allocation site(s) grew by "
            f"{_e(format_bytes(int_field(last.get('total_grown_bytes'))))}.</p>"
            + _table(["Site", "Grown", "Live before -> after", "Held by"], rows, numeric={1})
            + note)


def _leaks(profiler: Any, top: int) -> str:
    epochs = _epoch_checks(profiler)
    live = profiler.potential_leak_rows()
    total = int(live["size"].sum(dtype=np.uint64))
    leaks = profiler.detect_potential_leaks(top=top if top >= 0 else None)[:top]
    rows = [(f"0x{leak.address:x}", format_bytes(leak.size_bytes, 1),
             ("html", f"<code>{_e(site_name(leak.stack_trace))}</code>"),
             ("html", f"<pre>{_e(leak.stack_trace.format())}</pre>") if leak.stack_trace
             else ("html", '<span class="muted">no stack captured</span>'))
            for leak in leaks]
    intro = (f"<p>{len(live):,} allocations ({_e(format_bytes(total, 1))}) were still live at the "
             f"end of the trace; the largest {min(top, len(live))}:</p>") if len(live) else ""
    return epochs + intro + _table(["Address", "Size", "Site", "Stack"], rows, numeric={1})


def _gc(profiler: Any, top: int) -> str:
    recs = profiler.gc_records
    if not recs:
        return '<p class="muted">No garbage collections recorded.</p>'
    by_gen: dict[int, list[int]] = {}
    for r in recs:
        by_gen.setdefault(r.generation, []).append(r.duration_ns)
    summary = _table(["Generation", "Collections", "Total pause", "Longest"],
                     [(g, len(d), f"{sum(d) / 1e6:.2f} ms", f"{max(d) / 1e6:.2f} ms")
                      for g, d in sorted(by_gen.items())], numeric={1, 2, 3})
    worst = sorted(recs, key=lambda r: -r.duration_ns)[:top]
    detail = _table(["Start", "Step", "Generation", "Pause", "Collected", "Tensor bytes freed"],
                    [(_time(r.start_ns), r.step, r.generation, f"{r.duration_ns / 1e6:.2f} ms",
                      r.collected, format_bytes(r.tensor_bytes_freed, 1)) for r in worst],
                    numeric={1, 2, 3, 4, 5})
    return summary + f"<p>Longest {len(worst)} pauses:</p>" + detail


def _devices_cell(devices: Any) -> str:
    if isinstance(devices, (list, tuple)):
        parts = []
        for d in devices:
            get = d.get if isinstance(d, dict) else (lambda k, _d=d: getattr(_d, k, None))
            parts.append(f"{get('index')}: {get('name')} used {format_bytes(get('used_bytes') or 0, 1)}"
                         f" of {format_bytes(get('total_bytes') or 0, 1)}")
        return "; ".join(parts) or "no devices"
    return str(devices) if devices is not None else "not queried"


def _snapshots(profiler: Any, top: int) -> str:
    snaps = profiler.snapshots
    if not snaps:
        return '<p class="muted">No snapshots.</p>'
    stride = max(1, len(snaps) // top)
    rows = [(_time(s.timestamp_ns), s.step, format_bytes(s.current_usage_bytes, 1),
             format_bytes(s.peak_usage_bytes, 1),
             ", ".join(f"{k}: {format_bytes(v, 1)}" for k, v in s.usage_by_type.items()),
             _devices_cell(s.devices)) for s in snaps[::stride]]
    note = f"<p>{len(snaps):,} snapshots; every {stride}th shown.</p>" if stride > 1 else ""
    return note + _table(["Time", "Step", "Current", "Peak", "By type", "NVML devices"], rows,
                         numeric={1, 2, 3})


def _ooms(profiler: Any) -> str:
    rows = [(_time(o.timestamp_ns), o.device, format_bytes(o.requested_bytes, 1),
             format_bytes(o.device_free_bytes, 1), format_bytes(o.device_total_bytes, 1),
             format_bytes(o.live_bytes, 1), _stack_html(profiler, o.stack_id))
            for o in profiler.oom_events]
    return _table(["Time", "Device", "Requested", "Device free", "Device total", "Live (tracked)",
                   "Site"], rows, numeric={2, 3, 4, 5})


def to_html(profiler: Any, title: str = "torchmem memory report", top: int = 20,
            progress: Progress = None) -> str:
    """The report as one HTML string (see module doc); ``top`` rows per table."""
    profiler.flush()
    # Bokeh is imported when a report is written, not with torchmem.
    from ._interactive import interactive_views, read_report_data

    # Two reads of the events: the line chart and the site totals share the
    # first (a loaded trace's pass), the attribution views read both.
    timeline = Timeline(profiler)
    data = read_report_data(profiler, top=top, on_rows=timeline.feed)
    timeline.finish()
    stats = profiler.get_statistics()
    meta = dict(getattr(profiler, "trace_metadata", None) or {})
    steps = [0, 8]
    if progress:
        progress(2, steps[1])
    head, views = interactive_views(profiler, data)
    if progress:
        progress(3, steps[1])
    summary = _table(["Total allocated", "Total freed", "Current", "Peak", "Allocations", "Frees",
                      "Average size", "GC count", "GC time"],
                     [(format_bytes(stats.total_allocated_bytes, 1), format_bytes(stats.total_freed_bytes, 1),
                       format_bytes(stats.current_usage_bytes, 1), format_bytes(stats.peak_usage_bytes, 1),
                       f"{stats.allocation_count:,}", f"{stats.deallocation_count:,}",
                       format_bytes(stats.average_allocation_size_bytes, 1), stats.gc_count,
                       f"{stats.total_gc_time_ns / 1e6:.1f} ms")],
                     numeric=set(range(9)))
    by_type = _table(["Type", "Current"], [(k, format_bytes(v, 1)) for k, v in
                                           sorted(stats.usage_by_type.items())], numeric={1})
    sections = [("Memory over time", views["timeline"]),
                ("Peak", peak_html(data.report)),
                ("Modules", module_table_html(data.modules, top=top)),
                ("What was live at the peak, by stack", views["flame"])]
    for i, (name, fn) in enumerate([
            ("Top allocation sites", lambda: _sites(profiler, timeline, top)),
            ("Potential leaks", lambda: _leaks(profiler, top)),
            ("GC pauses", lambda: _gc(profiler, top)),
            ("Snapshots", lambda: _snapshots(profiler, top)),
            ("Out-of-memory errors", lambda: _ooms(profiler))], start=4):
        sections.append((name, fn()))
        if progress:
            progress(min(i, steps[1]), steps[1])
    meta_rows = [(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else v)
                 for k, v in sorted(meta.items()) if k != EPOCH_KEY]  # shown with the leaks
    sections.append(("Summary", summary + "<p>Live by type at the end:</p>" + by_type))
    sections.append(("Run", _table(["Key", "Value"], meta_rows)))
    body = "".join(f"<h2>{_e(name)}</h2>{html}" for name, html in sections)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width">'
            f"<title>{_e(title)}</title><style>{_CSS}</style>{head}</head><body>"
            f"<h1>{_e(title)}</h1><p class=\"muted\">{timeline.n_events:,} events; peak "
            f"{_e(format_bytes(stats.peak_usage_bytes, 1))}; generated "
            f"{_e(_time(int(datetime.datetime.now().timestamp() * 1e9)))}</p>{body}</body></html>")


def export_html(profiler: Any, path: str | os.PathLike, title: str = "torchmem memory report",
                top: int = 20, progress: Progress = None) -> None:
    """Writes ``to_html(profiler)`` to ``path`` (UTF-8, mode 0600)."""
    text = to_html(profiler, title=title, top=top, progress=progress)
    fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
