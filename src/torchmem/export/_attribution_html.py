"""The HTML report's attribution tables: the peak's breakdown (and each step's,
export._interactive shows it on a click), the table by module, and the colours
and frame names the interactive views share. Plain HTML, every string escaped.
"""

from __future__ import annotations

import zlib
from html import escape
from typing import Any, Sequence

from ..units import format_bytes

__all__ = ["CATEGORY_COLORS", "breakdown_html", "frame_color", "frame_text",
           "module_table_html", "peak_html"]

#: One colour per category (the screenshot test looks for them).
CATEGORY_COLORS = {"parameter": "#2e7d32", "buffer": "#00897b", "gradient": "#1565c0",
                   "optimizer_state": "#f9a825", "input": "#424242", "activation": "#c62828",
                   "temporary": "#8e24aa", "other": "#9e9e9e"}


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _bar(by_category: dict[str, int], width: int = 240) -> str:
    """A small stacked bar of a breakdown by category."""
    total = sum(by_category.values()) or 1
    cells = "".join(
        f'<span title="{_e(k)} {_e(format_bytes(v, 1))}" style="display:inline-block;height:10px;'
        f'width:{max(1, round(width * v / total))}px;background:{CATEGORY_COLORS.get(k, "#999")}">'
        f"</span>" for k, v in by_category.items() if v)
    return f'<span style="white-space:nowrap">{cells}</span>'


def breakdown_html(peak: Any, top: int | None = None, headline_id: str | None = None) -> str:
    """A peak (analysis.breakdown.Peak): its headline, a bar and its bytes by
    category, module and site (the ``top`` largest of each)."""

    def rows(d: dict[str, int]) -> str:
        return "".join(f'<tr><td>{_e(k)}</td><td class="num">{_e(format_bytes(v, 1))}</td>'
                       f'<td class="num">{100 * v / peak.bytes if peak.bytes else 0:.1f}%</td>'
                       "</tr>" for k, v in list(d.items())[:top])

    head = "<tr><th>{}</th><th>Bytes</th><th>Share</th></tr>"
    hid = f' id="{_e(headline_id)}"' if headline_id else ' class="step-headline"'
    return (f"<p{hid}><b>{_e(peak.headline())}</b></p><p>{_bar(peak.by_category, 600)}</p>"
            f"<table><tr><td>{'<table>' + head.format('Category') + rows(peak.by_category)}"
            f"</table></td><td>{'<table>' + head.format('Module') + rows(peak.by_module)}"
            f"</table></td><td>{'<table>' + head.format('Site (your line)')}"
            f"{rows(peak.by_site)}</table></td></tr></table>")


def peak_html(report: Any) -> str:
    """The overall peak: its headline, and its bytes by category, module and site."""
    if report is None:
        return '<p class="muted">The peak is older than the events held (no storage).</p>'
    if report.overall is None:
        return '<p class="muted">No allocations recorded.</p>'
    return breakdown_html(report.overall, headline_id="peak-headline")


def module_table_html(rows: Sequence[Any], top: int = 30) -> str:
    """Modules by their bytes at the overall peak: their own peak, those bytes, by category."""
    if not rows:
        return '<p class="muted">No module ran (attribution off, or no nn.Module).</p>'
    body = "".join(
        f'<tr><td><code>{_e(r.module)}</code></td><td class="num">'
        f"{_e(format_bytes(r.peak_bytes, 1))}</td><td class=\"num\">"
        f"{_e(format_bytes(r.at_peak_bytes, 1))}</td><td>{_bar(r.at_peak_by_category)} "
        + ", ".join(f"{_e(k)} {_e(format_bytes(v, 1))}" for k, v in r.at_peak_by_category.items())
        + "</td></tr>" for r in rows[:top])
    more = (f'<p class="muted">{len(rows) - top} more modules.</p>' if len(rows) > top else "")
    return ('<table id="module-table"><tr><th>Module</th><th>Its peak</th><th>At the overall '
            f"peak</th><th>By category at the overall peak</th></tr>{body}</table>{more}")


def frame_text(frame: tuple[str, int, str] | None) -> str:
    return "(no stack captured)" if frame is None else f"{frame[2]} ({frame[0]}:{frame[1]})"


def frame_color(frame: tuple[str, int, str] | None) -> str:
    if frame is None:
        return "#bdbdbd"
    h = zlib.crc32(frame[0].encode()) % 40  # warm hues, stable per file
    return f"hsl({10 + h}, 75%, {62 + zlib.crc32(frame[2].encode()) % 14}%)"


