"""The out-of-memory report as one self-contained HTML page (beside the other HTML exports).

``render_html(data, text)`` takes the report data of
``torchmem.analysis.oom.build_report`` and its text (``torchmem.reports.oom``).
"""

from __future__ import annotations

import html
from typing import Any

from ..analysis.sites import device_label
from ..units import format_bytes

__all__ = ["render_html"]


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


def _attribution(a: dict[str, Any]) -> str:
    """What was live at the failure by category, module and phase, as tables."""
    e = html.escape
    if not a or "error" in a or not sum(a["by_category"].values()):
        return ""
    total = sum(a["by_category"].values())
    who = (f"{a['running_phase']} of {a['running_module']}" if a["running_module"]
           else a["running_phase"])
    tables = "".join(
        f"<td><table><tr><th>{e(title)}</th><th>live</th><th>share</th></tr>"
        + "".join(f"<tr><td>{e(k)}</td><td>{e(format_bytes(v))}</td>"
                  f"<td>{100 * v / total:.0f}%</td></tr>" for k, v in list(d.items())[:10])
        + "</table></td>"
        for title, d in (("category", a["by_category"]), ("module", a["by_module"]),
                         ("phase", a["by_phase"])))
    return (f"<h2>What was live at the failure</h2><p>{e(who)} was running.</p>"
            f"<table><tr>{tables}</tr></table>")


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
            f"{e(device_label(data['device']))}, step {data['step']}</p>"
            f"{_attribution(data.get('attribution') or {})}"
            f"<h2>Memory over the last {data['timeline']['window_s']:g} s</h2>"
            f"{_svg(data['timeline']['points'])}"
            f"<h2>Live allocations by site ({e(data['sites_scope'])})</h2>"
            "<table><tr><th>live</th><th>count</th><th>site</th></tr>"
            f"{''.join(rows)}</table><h2>Full text</h2><pre>{e(text)}</pre></body></html>")
