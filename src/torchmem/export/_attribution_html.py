"""The HTML report's attribution sections: memory over time stacked by category
(steps on the axis), the peak's breakdown, a table by module, and an icicle
graph of what was live at the peak by stack (the stack on hover). Inline SVG
and plain HTML: no script, every string escaped (hover text is SVG <title>).
"""

from __future__ import annotations

import zlib
from html import escape
from typing import Any, Sequence

import numpy as np

from ..analysis.breakdown import peak_report
from ..analysis.categories import CATEGORIES
from ..analysis.timeline import category_timeline, module_table, peak_stacks
from ..units import format_bytes

__all__ = ["CATEGORY_COLORS", "attribution_sections", "category_chart", "flame_graph",
           "module_table_html", "peak_html"]

#: One colour per category (the screenshot test looks for them).
CATEGORY_COLORS = {"parameter": "#2e7d32", "buffer": "#00897b", "gradient": "#1565c0",
                   "optimizer_state": "#f9a825", "input": "#424242", "activation": "#c62828",
                   "temporary": "#8e24aa", "other": "#9e9e9e"}
WIDTH, HEIGHT = 960, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 20, 20, 46


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _legend(names: Sequence[str]) -> str:
    return '<div class="legend-row">' + "".join(
        f'<span class="legend"><span class="swatch" style="background:{CATEGORY_COLORS[n]}">'
        f"</span>{_e(n)}</span>" for n in names) + "</div>"


def category_chart(tl: Any) -> str:
    """An SVG of live bytes over the run, one stacked band per category; the x axis
    follows the events and is labelled with the training step at each tick
    (``tl``: a CategoryTimeline)."""
    n = len(tl.seq)
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    parts = [f'<svg id="category-chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="memory over time by category">',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="#ffffff" '
             f'stroke="#999999"/>']
    if n == 0:
        return "".join(parts) + "</svg>" + '<p class="muted">No allocation events.</p>'
    # Along the events, not the clock: idle time (start-up, data loading)
    # would squeeze the training steps into a corner.
    t = (tl.seq - tl.seq[0]).astype(float)
    span = float(t[-1]) or 1.0
    x = _LEFT + pw * (t / span if n > 1 else np.zeros(n) + 0.5)
    total = tl.total().astype(float)
    y_max = float(total.max()) or 1.0
    yv = lambda v: _TOP + ph * (1 - np.asarray(v, dtype=float) / y_max)  # noqa: E731
    for i in range(5):
        v = y_max * i / 4
        yy = float(yv(v))
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="#eeeeee"/><text x="{_LEFT - 6}" y="{yy + 4:.1f}" '
                     f'text-anchor="end" font-size="11">{_e(format_bytes(v, 1))}</text>')
    # Steps on the axis: a tick where each step begins (at most ~12 labelled).
    starts = np.flatnonzero(np.r_[True, tl.step[1:] != tl.step[:-1]])
    stride = max(1, len(starts) // 12)
    for k, i in enumerate(starts):
        xx = float(x[i])
        label = k % stride == 0
        parts.append(f'<line x1="{xx:.1f}" x2="{xx:.1f}" y1="{_TOP + ph}" '
                     f'y2="{_TOP + ph + (6 if label else 3)}" stroke="#666666"/>')
        if label:
            parts.append(f'<text x="{xx:.1f}" y="{_TOP + ph + 18}" text-anchor="middle" '
                         f'font-size="11">{int(tl.step[i])}</text>')
    parts.append(f'<text x="{_LEFT + pw / 2:.0f}" y="{HEIGHT - 6}" text-anchor="middle" '
                 f'font-size="11">training step</text>')
    lower = np.zeros(n)
    shown = []
    for name in CATEGORIES:
        values = tl.bytes[name].astype(float)
        if not values.any():
            continue
        upper = lower + values
        xs = np.concatenate([x, x[::-1]])
        ys = np.concatenate([yv(upper), yv(lower)[::-1]])
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs.tolist(), ys.tolist()))
        parts.append(f'<polygon class="band" fill="{CATEGORY_COLORS[name]}" stroke="none" '
                     f'points="{pts}"><title>{_e(name)}: up to '
                     f'{_e(format_bytes(values.max(), 1))}</title></polygon>')
        shown.append(name)
        lower = upper
    parts.append("</svg>")
    return "".join(parts) + _legend(shown)


def _bar(by_category: dict[str, int], width: int = 240) -> str:
    """A small stacked bar of a breakdown by category."""
    total = sum(by_category.values()) or 1
    cells = "".join(
        f'<span title="{_e(k)} {_e(format_bytes(v, 1))}" style="display:inline-block;height:10px;'
        f'width:{max(1, round(width * v / total))}px;background:{CATEGORY_COLORS.get(k, "#999")}">'
        f"</span>" for k, v in by_category.items() if v)
    return f'<span style="white-space:nowrap">{cells}</span>'


def peak_html(report: Any) -> str:
    """The overall peak: its headline, and its bytes by category, module and site."""
    p = report.overall
    if p is None:
        return '<p class="muted">No allocations recorded.</p>'

    def rows(d: dict[str, int]) -> str:
        return "".join(f'<tr><td>{_e(k)}</td><td class="num">{_e(format_bytes(v, 1))}</td>'
                       f'<td class="num">{100 * v / p.bytes if p.bytes else 0:.1f}%</td></tr>'
                       for k, v in d.items())

    head = "<tr><th>{}</th><th>Bytes</th><th>Share</th></tr>"
    return (f'<p id="peak-headline"><b>{_e(p.headline())}</b></p><p>{_bar(p.by_category, 600)}'
            f"</p><table><tr><td>{'<table>' + head.format('Category') + rows(p.by_category)}"
            f"</table></td><td>{'<table>' + head.format('Module') + rows(p.by_module)}</table>"
            f"</td><td>{'<table>' + head.format('Site (your line)') + rows(p.by_site)}</table>"
            f"</td></tr></table>")


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


def _frame_text(frame: tuple[str, int, str] | None) -> str:
    return "(no stack captured)" if frame is None else f"{frame[2]} ({frame[0]}:{frame[1]})"


def _frame_color(frame: tuple[str, int, str] | None) -> str:
    if frame is None:
        return "#bdbdbd"
    h = zlib.crc32(frame[0].encode()) % 40  # warm hues, stable per file
    return f"hsl({10 + h}, 75%, {62 + zlib.crc32(frame[2].encode()) % 14}%)"


FLAME_ROW = 18


def flame_graph(root: Any, width: int = WIDTH, max_depth: int = 32) -> str:
    """An icicle graph of ``root`` (a StackNode): outermost frame on top, each
    frame as wide as the bytes live below it; hovering shows the stack."""
    if root.bytes <= 0:
        return '<p class="muted">Nothing was live.</p>'
    rects: list[str] = []
    depth_used = 0

    def draw(node: Any, x0: float, depth: int, path: list[str]) -> None:
        nonlocal depth_used
        x = x0
        for child in node.children:
            w = width * child.bytes / root.bytes
            if w < 0.5:  # narrower than a pixel: left out (its bytes stay in the parent)
                x += w
                continue
            stack = path + [_frame_text(child.frame)]
            y = depth * FLAME_ROW
            depth_used = max(depth_used, depth + 1)
            label = child.frame[2] if child.frame else "(no stack)"
            tip = (f"{format_bytes(child.bytes, 1)} ({100 * child.bytes / root.bytes:.1f}%)\n"
                   + "\n".join(reversed(stack)))
            text = (f'<text x="{x + 3:.1f}" y="{y + 13}" font-size="11" fill="#222">'
                    f"{_e(label[: max(0, int(w / 7))])}</text>" if w > 20 else "")
            rects.append(f'<g class="frame"><title>{_e(tip)}</title><rect x="{x:.1f}" y="{y}" '
                         f'width="{max(w - 0.5, 0.5):.1f}" height="{FLAME_ROW - 1}" '
                         f'fill="{_frame_color(child.frame)}"/>{text}</g>')
            if depth + 1 < max_depth:
                draw(child, x, depth + 1, stack)
            x += w

    draw(root, 0.0, 0, [])
    height = max(depth_used, 1) * FLAME_ROW
    return (f'<svg id="flame-graph" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="live bytes at the peak by stack">{"".join(rects)}</svg>'
            '<p class="muted">Outermost frame on top; a frame is as wide as the bytes live '
            "below it at the peak. Hover a frame for its stack.</p>")


def attribution_sections(profiler: Any, top: int = 20) -> list[tuple[str, str]]:
    """(title, html) of each attribution section, for the report."""
    try:
        report = peak_report(profiler, top=top)
    except ValueError as exc:  # the peak's events are gone (no storage)
        return [("Peak", f'<p class="muted">{_e(exc)}</p>')]
    return [
        ("Memory over time by category", category_chart(category_timeline(profiler))),
        ("Peak", peak_html(report)),
        ("Modules", module_table_html(module_table(profiler), top=top)),
        ("What was live at the peak, by stack", flame_graph(peak_stacks(profiler))),
    ]
