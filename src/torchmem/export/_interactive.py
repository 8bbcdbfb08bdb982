"""The HTML report's interactive views, drawn by Bokeh (its JavaScript inlined:
the file works offline).

- the allocation timeline: every allocation a band (the memory_viz way,
  export._bands), coloured by category; hovering a band shows its size,
  lifetime and stack;
- memory over time stacked by category, hovering shows the bytes of each;
- the steps: clicking one shows its peak's breakdown below;
- the three share their x axis (event order, labelled with training steps),
  so zooming (wheel, box) or panning one moves all;
- a flame graph (icicle) of what was live at the peak by stack, hovering a
  frame shows its stack.

Why Bokeh rather than plotly: one ``patches`` glyph holds thousands of
polygons with a hover per polygon (plotly's filled areas hover per trace,
so a band would be a trace), its JavaScript is 1.3 MB inline against 4.6 MB,
and it needs neither pandas nor a browser at export time. Every string is
escaped: tooltips insert fields as text, and the step breakdowns are HTML
escaped here before the page sets them.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from bokeh.embed import components
from bokeh.layouts import column
from bokeh.models import (ColumnDataSource, CustomJS, CustomJSHover, CustomJSTickFormatter,
                          HoverTool, Range1d, TapTool)
from bokeh.plotting import figure
from bokeh.resources import Resources

from ..analysis.categories import CATEGORIES, Lifetimes
from ..analysis.run_moments import RunMoments, run_moments
from ..analysis.sites import site_name
from ..analysis.timeline import CategoryTimeline, StackNode
from ..units import format_bytes
from ._attribution_html import CATEGORY_COLORS, breakdown_html, frame_color, frame_text
from ._bands import layout_bands

__all__ = ["ReportData", "interactive_views", "read_report_data"]

REST_COLOR = "#d7d7d7"
WIDTH = 1000
_TOOLS = "xpan,xwheel_zoom,box_zoom,reset,save"
_STACK_LINES = 24  # frames shown in a tooltip


#: What the interactive views read from a trace (analysis.run_moments).
ReportData = RunMoments


def read_report_data(profiler: Any, points: int = 1000, top: int = 5,
                     max_steps: int = 2000, on_rows: Any = None) -> ReportData:
    """The one place the interactive views read the trace (analysis.run_moments:
    memory bounded by the moments shown, not by the events): ``points``
    moments for the timelines, at most ``max_steps`` step boxes, the peak's
    breakdowns and the stacks live then; ``on_rows`` gets the events of the
    first read, a batch at a time."""
    return run_moments(profiler, points=points, top=top, max_steps=max_steps, on_rows=on_rows)


# Axis labels: the step of an event seq (binary search over step starts), bytes in IEC units.
_STEP_TICKS = """
let lo = 0, hi = seqs.length - 1;
if (hi < 0) return String(tick);
while (lo < hi) { const mid = (lo + hi + 1) >> 1; if (seqs[mid] <= tick) lo = mid; else hi = mid - 1; }
return "step " + steps[lo];
"""
_BYTE_TICKS = """
const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let v = Math.abs(tick), i = 0;
while (v >= 1024 && i < u.length - 1) { v /= 1024; i++; }
return (tick < 0 ? "-" : "") + (i ? v.toFixed(1) : v.toFixed(0)) + " " + u[i];
"""
# Clicking a step: its breakdown built into the page from the step's columns
# (label indices and bytes, three tables), text set with textContent only.
_SHOW_STEP = """
const i = source.selected.indices[0];
const el = document.getElementById("step-breakdown");
if (i === undefined || !el) return;
const d = source.data, total = d.bytes[i];
const fmt = (tick) => {%s};
const cell = (row, text, cls) => { const c = row.insertCell(); c.textContent = text;
                                   if (cls) c.className = cls; };
const p = document.createElement("p"), b = document.createElement("b");
p.className = "step-headline"; b.textContent = d.headline[i]; p.append(b);
const outer = document.createElement("table"), line = outer.insertRow();
for (const [title, col] of [["Category", "cats"], ["Module", "mods"], ["Site (your line)", "sites"]]) {
  const t = document.createElement("table"), h = t.insertRow();
  for (const x of [title, "Bytes", "Share"]) { const th = document.createElement("th");
                                              th.textContent = x; h.append(th); }
  const a = d[col][i];
  for (let k = 0; k + 1 < a.length; k += 2) {
    const r = t.insertRow();
    cell(r, labels[a[k]]); cell(r, fmt(a[k + 1]), "num");
    cell(r, (total ? 100 * a[k + 1] / total : 0).toFixed(1) + "%%", "num");
  }
  line.insertCell().append(t);
}
el.replaceChildren(p, outer);
""" % _BYTE_TICKS


def _step_axis(tl: CategoryTimeline) -> CustomJSTickFormatter:
    starts = np.flatnonzero(np.r_[True, tl.step[1:] != tl.step[:-1]]) if len(tl.seq) else []
    return CustomJSTickFormatter(args={"seqs": tl.seq[starts].tolist(),
                                       "steps": tl.step[starts].tolist()}, code=_STEP_TICKS)


def _figure(title: str, height: int, x_range: Any, y_label: str | None = "live bytes") -> Any:
    fig = figure(title=title, height=height, width=WIDTH, x_range=x_range, tools=_TOOLS,
                 active_scroll="xwheel_zoom", sizing_mode="stretch_width",
                 output_backend="canvas")
    fig.toolbar.logo = None
    fig.yaxis.formatter = CustomJSTickFormatter(code=_BYTE_TICKS)
    if y_label:
        fig.yaxis.axis_label = y_label
    fig.xgrid.visible = False
    return fig


def _lifetime(lt: Lifetimes, i: int, first_seq: int) -> str:
    a, f = int(lt.alloc_seq[i]), int(lt.free_seq[i])
    begin = "before the first event held" if a < first_seq else f"step {int(lt.alloc_step[i])}"
    if f >= 2**62:
        return f"{begin} to the end (still live)"
    t0, t1 = int(lt.alloc_ns[i]), int(lt.free_ns[i])
    took = f" ({(t1 - t0) / 1e6:.3f} ms)" if t0 else ""  # made before the events held: unknown
    return f"{begin} to step {int(lt.free_step[i])}{took}"


def _stack_text(profiler: Any, stack_id: int, cache: dict[int, tuple[str, str]]
                ) -> tuple[str, str]:
    hit = cache.get(stack_id)
    if hit is None:
        trace = profiler.resolve_stack(stack_id) if stack_id else None
        if trace is None or not trace.frames:
            hit = ("(no stack captured)", "")
        else:
            lines = trace.format().splitlines()
            more = len(lines) - _STACK_LINES
            hit = (site_name(trace), "\n".join(lines[:_STACK_LINES])
                   + (f"\n  ... {more} more frames" if more > 0 else ""))
        cache[stack_id] = hit
    return hit


def _shade(hex_color: str, lighter: int) -> str:
    """``hex_color``, or with ``lighter`` 18% of the way to white."""
    if not lighter:
        return hex_color
    rgb = [int(hex_color[i:i + 2], 16) for i in (1, 3, 5)]
    return "#" + "".join(f"{round(c + (255 - c) * 0.18):02x}" for c in rgb)


def _bands_figure(profiler: Any, data: ReportData, x_range: Any) -> Any:
    lt, tl = data.bands, data.timeline
    bands = layout_bands(lt.alloc_seq, lt.free_seq, lt.size, tl.seq, tl.total(), max_bands=1000)
    cache: dict[int, tuple[str, str]] = {}
    cols: dict[str, list[Any]] = {k: [] for k in ("xs", "ys", "color", "size", "what",
                                                  "lifetime", "site", "stack")}
    stacks: dict[str, int] = {}  # each stack's text once; a band holds its index
    for b, i in enumerate(bands.index.tolist()):
        cat = data.band_categories[i]
        site, stack = _stack_text(profiler, int(lt.stack_id[i]), cache)
        device = int(lt.device[i])
        cols["xs"].append(bands.xs[b].astype(np.float32))
        cols["ys"].append(bands.ys[b].astype(np.float32))
        # Neighbours of one category told apart by shade (no outline: thin bands
        # would be all outline).
        cols["color"].append(_shade(CATEGORY_COLORS.get(cat, REST_COLOR), b % 2))
        cols["size"].append(format_bytes(int(lt.size[i]), 1))
        cols["what"].append(f"{cat}, {profiler.type_name(int(lt.type_id[i]))} on "
                            + ("host" if device < 0 else f"cuda:{device}"))
        cols["lifetime"].append(_lifetime(lt, i, data.first_seq))
        cols["site"].append(site)
        cols["stack"].append(stacks.setdefault(stack, len(stacks)))
    fig = _figure(f"Every allocation as a band ({len(bands.index):,} drawn; "
                  f"{bands.rest_count:,} smaller ones together in grey on top)", 340, x_range)
    r = fig.patches("xs", "ys", source=ColumnDataSource(cols, name="bands-data"), fill_color="color",
                    line_color=None, name="bands")
    lookup = CustomJSHover(args={"stacks": list(stacks)}, code="return stacks[value]")
    fig.add_tools(HoverTool(renderers=[r], point_policy="follow_mouse", tooltips=(
        '<div class="tm-tip" style="max-width:640px"><b>@size</b> &middot; @what<br>'
        '@lifetime<br><code>@site</code><pre style="font-size:11px;margin:4px 0 0;'
        'white-space:pre-wrap;word-break:break-all">@stack{custom}</pre></div>'),
        formatters={"@stack": lookup}))
    if len(bands.rest_x):
        x = bands.rest_x.astype(np.float32)
        rest = fig.varea(x=x, y1=bands.rest_bottom.astype(np.float32),
                         y2=bands.rest_top.astype(np.float32), fill_color=REST_COLOR)
        rest.name = "rest"
    fig.xaxis.formatter = _step_axis(tl)
    fig.name = "bands-figure"
    return fig


def _category_figure(tl: CategoryTimeline, x_range: Any) -> Any:
    shown = [c for c in CATEGORIES if c in tl.bytes and tl.bytes[c].any()]
    src: dict[str, Any] = {"x": tl.seq.astype(np.float64), "step": tl.step.tolist(),
                           "total": tl.total().astype(np.float64),
                           "total_text": [format_bytes(int(v), 1) for v in tl.total().tolist()]}
    for c in shown:
        src[c] = tl.bytes[c].astype(np.float64)
        src[c + "_text"] = [format_bytes(int(v), 1) for v in tl.bytes[c].tolist()]
    source = ColumnDataSource(src, name="categories-data")
    fig = _figure("Live bytes by category", 300, x_range)
    if shown:
        fig.varea_stack(stackers=shown, x="x", color=[CATEGORY_COLORS[c] for c in shown],
                        legend_label=shown, source=source)
        fig.legend.location = "top_left"
        fig.legend.orientation = "horizontal"
        fig.legend.background_fill_alpha = 0.7
    line = fig.line("x", "total", source=source, line_color="#333333", line_width=1)
    rows = "".join(f"<tr><td>{c}</td><td>@{{{c}_text}}</td></tr>" for c in shown)
    fig.add_tools(HoverTool(renderers=[line], mode="vline", tooltips=(
        f"<div><b>step @step</b>: @total_text<table>{rows}</table></div>")))
    fig.xaxis.formatter = _step_axis(tl)
    fig.name = "category-figure"
    return fig


def _steps_figure(data: ReportData, x_range: Any) -> tuple[Any, str]:
    """A strip with one box per step (click: its breakdown), and the first breakdown shown.
    Past ``max_steps`` steps a box holds several, shown by the highest peak of them."""
    boxes = data.boxes
    if not boxes or data.report is None:
        return None, '<p class="muted">No steps.</p>'
    left = np.array([b.first_seq for b in boxes], np.float64)
    right = np.array([b.end_seq for b in boxes], np.float64)
    names = [str(b.first_step) if b.first_step == b.last_step
             else f"{b.first_step}-{b.last_step}" for b in boxes]
    peaks = [b.peak for b in boxes]
    # Breakdowns as label indices and bytes: a site named in a thousand steps is stored once.
    labels: dict[str, int] = {}

    def flat(d: dict[str, int] | None, n: int = 5) -> list[int]:
        out: list[int] = []
        for k, v in list((d or {}).items())[:n]:
            out += [labels.setdefault(k, len(labels)), int(v)]
        return out

    src = ColumnDataSource({
        "left": left, "right": right, "step": [b.first_step for b in boxes], "steps": names,
        "color": ["#90a4ae" if k % 2 else "#cfd8dc" for k in range(len(names))],
        "peak": [format_bytes(p.bytes, 1) if p else "-" for p in peaks],
        "bytes": [p.bytes if p else 0 for p in peaks],
        "headline": [(p.headline() if p else f"step {s}: no peak")
                     + ("" if b.first_step == b.last_step else f" (the highest of steps {s})")
                     for s, p, b in zip(names, peaks, boxes)],
        "cats": [flat(p.by_category if p else None, len(CATEGORIES)) for p in peaks],
        "mods": [flat(p.by_module if p else None) for p in peaks],
        "sites": [flat(p.by_site if p else None) for p in peaks]}, name="steps-data")
    fig = _figure("Steps (click one for its peak's breakdown)", 110, x_range, y_label=None)
    fig.yaxis.visible = False
    fig.ygrid.visible = False
    r = fig.quad(left="left", right="right", bottom=0, top=1, source=src, fill_color="color",
                 line_color="white", selection_fill_color="#ff7043", nonselection_fill_alpha=1.0,
                 name="steps")
    fig.add_tools(HoverTool(renderers=[r], tooltips="<b>step @steps</b>: peak @peak"),
                  TapTool(renderers=[r]))
    src.selected.js_on_change("indices", CustomJS(args={"source": src, "labels": list(labels)},
                                                  code=_SHOW_STEP))
    fig.xaxis.visible = False
    fig.name = "steps-figure"
    overall = data.report.overall
    first = next((b.peak for b in boxes if overall is not None
                  and b.first_step <= overall.step <= b.last_step), None)
    intro = ('<p class="muted">The step of the overall peak; click another step above.</p>'
             if first else "")
    return fig, intro + (breakdown_html(first, top=5) if first else "")


def _flame_figure(root: StackNode, min_fraction: float = 0.001, max_depth: int = 48) -> Any:
    """An icicle of ``root``: outermost frame on top, each as wide as the bytes live below it."""
    cols: dict[str, list[Any]] = {k: [] for k in ("left", "right", "top", "bottom", "color",
                                                  "label", "frame", "bytes", "stack")}
    depth_used = 0

    def visit(node: StackNode, x0: float, depth: int, path: list[str]) -> None:
        nonlocal depth_used
        x = x0
        for child in node.children:
            w = child.bytes / root.bytes
            if w >= min_fraction:
                text = frame_text(child.frame)
                stack = [text] + path
                depth_used = max(depth_used, depth + 1)
                cols["left"].append(x)
                cols["right"].append(x + w)
                cols["top"].append(-depth)
                cols["bottom"].append(-depth - 0.95)
                cols["color"].append(frame_color(child.frame))
                name = child.frame[2] if child.frame else "(no stack)"
                cols["label"].append(name if w > 0.04 else "")
                cols["frame"].append(text)
                cols["bytes"].append(f"{format_bytes(child.bytes, 1)} "
                                     f"({100 * w:.1f}% of the peak's live bytes)")
                cols["stack"].append("\n".join(stack[:_STACK_LINES]))
                if depth + 1 < max_depth:
                    visit(child, x, depth + 1, stack)
            x += w

    if root.bytes > 0:
        visit(root, 0.0, 0, [])
    height = 60 + 20 * max(depth_used, 1)
    fig = figure(title="What was live at the peak, by stack (outermost frame on top)",
                 height=height, width=WIDTH, sizing_mode="stretch_width", tools=_TOOLS,
                 active_scroll="xwheel_zoom", x_range=Range1d(0, 1, bounds=(0, 1)),
                 y_range=Range1d(-max(depth_used, 1), 0.1))
    fig.toolbar.logo = None
    fig.name = "flame-figure"
    fig.axis.visible = False
    fig.grid.visible = False
    src = ColumnDataSource(cols, name="flame-data")
    r = fig.quad(left="left", right="right", top="top", bottom="bottom", source=src,
                 fill_color="color", line_color="white", name="flame")
    fig.text(x="left", y="top", text="label", source=src, x_offset=3, y_offset=3,
             text_font_size="11px", text_baseline="top")
    fig.add_tools(HoverTool(renderers=[r], tooltips=(
        '<div class="tm-flame-tip" style="max-width:640px"><b>@frame</b><br>@bytes'
        '<pre style="font-size:11px;margin:4px 0 0;white-space:pre-wrap;word-break:break-all">'
        "@stack</pre></div>")))
    return fig


def interactive_views(profiler: Any, data: ReportData | None = None
                      ) -> tuple[str, dict[str, str]]:
    """(the page's head: Bokeh's JavaScript inline; the views' HTML by name:
    "timeline" (bands, categories, steps and the step breakdown) and "flame")."""
    data = data or read_report_data(profiler)
    x_range = Range1d(*(_x_bounds(data)))
    x_range.bounds = "auto"
    bands = _bands_figure(profiler, data, x_range)
    cats = _category_figure(data.timeline, x_range)
    steps, breakdown = _steps_figure(data, x_range)
    flame = _flame_figure(data.stacks)
    timeline = column([f for f in (bands, cats, steps) if f is not None],
                      sizing_mode="stretch_width")
    models: Sequence[Any] = (timeline, flame)
    script, (div_timeline, div_flame) = components(models)
    # Bokeh's core alone (no widgets, tables, WebGL, MathJax): 1.3 MB inline.
    head = Resources(mode="inline", components=["bokeh"]).render_js() + script
    return head, {"timeline": div_timeline + f'<div id="step-breakdown">{breakdown}</div>',
                  "flame": div_flame}


def _x_bounds(data: ReportData) -> tuple[float, float]:
    seq = data.timeline.seq
    if not len(seq):
        return (0.0, 1.0)
    lo, hi = float(seq[0]), float(seq[-1])
    return (lo, hi if hi > lo else lo + 1.0)
