"""The inline SVG line chart of the HTML report (no JavaScript, works offline)."""

from __future__ import annotations

from html import escape
from typing import Sequence

import numpy as np

from ..units import format_bytes

#: Series colours; the report's screenshot test looks for the first one.
COLORS = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
          "#17becf", "#bcbd22", "#7f7f7f")
WIDTH, HEIGHT = 960, 320
_LEFT, _RIGHT, _TOP, _BOTTOM = 80, 20, 20, 40


def downsample(t: np.ndarray, y: np.ndarray, buckets: int = 1200) -> tuple[np.ndarray, np.ndarray]:
    """At most ~2 points per time bucket (the bucket's max and last), so peaks stay visible."""
    if len(t) <= 2 * buckets:
        return t, y
    edges = np.linspace(t[0], t[-1], buckets + 1)
    idx = np.clip(np.searchsorted(edges, t, side="right") - 1, 0, buckets - 1)
    starts = np.flatnonzero(np.r_[True, idx[1:] != idx[:-1]])
    maxes = np.maximum.reduceat(y, starts)
    last = np.r_[starts[1:] - 1, len(y) - 1]
    out_t = np.repeat(t[last], 2)
    out_t[0::2] = t[starts]
    out_y = np.empty(2 * len(starts), dtype=y.dtype)
    out_y[0::2], out_y[1::2] = maxes, y[last]
    return out_t, out_y


def line_chart(series: Sequence[tuple[str, np.ndarray, np.ndarray]], markers: Sequence[float],
               marker_label: str = "step") -> str:
    """An SVG chart of ``series`` ((name, t_seconds, bytes) each, drawn as steps).

    ``markers`` are times (seconds) drawn as thin vertical lines (step starts).
    """
    pw, ph = WIDTH - _LEFT - _RIGHT, HEIGHT - _TOP - _BOTTOM
    t_max = max((float(t[-1]) for _, t, _ in series if len(t)), default=1.0) or 1.0
    y_max = max((float(y.max()) for _, _, y in series if len(y)), default=1.0) or 1.0
    x = lambda t: _LEFT + pw * (np.asarray(t, dtype=float) / t_max)  # noqa: E731
    yv = lambda v: _TOP + ph * (1 - np.asarray(v, dtype=float) / y_max)  # noqa: E731
    parts = [f'<svg id="memory-chart" xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" '
             f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
             f'aria-label="memory over time by type">',
             f'<rect x="{_LEFT}" y="{_TOP}" width="{pw}" height="{ph}" fill="#ffffff" '
             f'stroke="#999999"/>']
    for i in range(5):  # y grid and labels
        v = y_max * i / 4
        yy = float(yv(v))
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'stroke="#eeeeee"/><text x="{_LEFT - 6}" y="{yy + 4:.1f}" '
                     f'text-anchor="end" font-size="11">{escape(format_bytes(v, 1))}</text>')
    for i in range(6):  # x labels
        t = t_max * i / 5
        parts.append(f'<text x="{float(x(t)):.1f}" y="{HEIGHT - _BOTTOM + 16}" '
                     f'text-anchor="middle" font-size="11">{t:.2f} s</text>')
    stride = max(1, len(markers) // 100)  # at most ~100 marker lines
    for i, m in enumerate(markers[::stride]):
        xx = float(x(m))
        parts.append(f'<line class="marker" x1="{xx:.1f}" x2="{xx:.1f}" y1="{_TOP}" '
                     f'y2="{_TOP + ph}" stroke="#bbbbbb" stroke-dasharray="3,3">'
                     f'<title>{escape(marker_label)} {i * stride}</title></line>')
    # Drawn last to first: the first series (the total) ends up on top, so
    # a single type's identical line does not hide it; it is dashed so the
    # line beneath still shows.
    for k, (name, t, y) in reversed(list(enumerate(series))):
        if not len(t):
            continue
        t, y = downsample(np.asarray(t, dtype=float), np.asarray(y, dtype=float))
        # Step-wise: usage holds its value until the next event.
        xs, ys = x(np.repeat(t, 2)[1:]), yv(np.repeat(y, 2)[:-1])
        pts = " ".join(f"{a:.1f},{b:.1f}" for a, b in zip(xs.tolist(), ys.tolist()))
        dash = ' stroke-dasharray="6,4"' if k == 0 and len(series) > 1 else ""
        parts.append(f'<polyline class="series" fill="none" stroke="{COLORS[k % len(COLORS)]}" '
                     f'stroke-width="2"{dash} points="{pts}"><title>{escape(name)}</title>'
                     '</polyline>')
    parts.append("</svg>")
    legend = "".join(
        f'<span class="legend"><span class="swatch" style="background:{COLORS[k % len(COLORS)]}">'
        f'</span>{escape(name)}</span>' for k, (name, _, _) in enumerate(series))
    return "".join(parts) + f'<div class="legend-row">{legend}</div>'
