"""HTML report: self-contained, every string escaped."""

from __future__ import annotations

import re

import torchmem
from torchmem.export import export_html, to_html

from _trace_helpers import make_workload

EVIL = "<script>alert(1)</script>"


def _evil_profiler():
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    ns = {}
    exec("def f(p):\n    p.track_allocation(0xdead0, 4096, 'T<b>x</b>')\n", ns)
    f = ns["f"]
    f.__code__ = f.__code__.replace(co_name=EVIL, co_qualname=EVIL)
    f(p)
    make_workload(p)
    p.track_snapshot()
    return p


def test_frame_names_and_types_are_escaped(tmp_path):
    p = _evil_profiler()
    assert p.detect_potential_leaks()[0].stack_trace.frames[0][2] == EVIL
    out = tmp_path / "report.html"
    export_html(p, out)
    text = out.read_text(encoding="utf-8")
    head, body = text.split("</head>", 1)
    assert EVIL not in text and "<b>x</b>" not in text
    # Scripts: Bokeh's (its code, its log level) and the views', in the head; none in the body.
    assert "<script" not in body.lower()
    assert head.lower().count("<script") == 3
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body  # the sites table
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in head  # the bands' and flame's data
    assert "T&lt;b&gt;x&lt;/b&gt;" in text
    p.close()


def test_report_sections_and_offline(tmp_path):
    p = _evil_profiler()
    text = to_html(p, title="run <1>")
    p.close()
    for section in ("Memory over time", "Peak", "Modules", "What was live at the peak, by stack",
                    "Top allocation sites", "Potential leaks", "GC pauses", "Snapshots",
                    "Out-of-memory errors", "Summary"):
        assert f"<h2>{section}</h2>" in text
    assert "<title>run &lt;1&gt;</title>" in text
    # Self-contained: no external fetches (tests/test_html_browser.py loads it with
    # every request refused). Bokeh's code holds a MathJax loader, used only for
    # TeX in labels, which the report has none of.
    head, body = text.split("</head>", 1)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", body)
    assert 'src="' not in head.replace('t.src="https://cdn.jsdelivr.net/npm/mathjax', "")
    # Every allocation a band: 0x1000, 0x2000, 0x7000, 0x8000, 0x9000, 0x5000, 0x6000, 0xdead0.
    assert text.count('"bands-data"') == 1 and '"steps-data"' in text
    assert "1.0 GiB" in text  # the OOM request
    assert "unavailable" in text or "used" in text  # NVML column of the snapshot


def test_empty_profiler_report():
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    text = to_html(p)
    p.close()
    assert "No allocations recorded" in text and "No steps" in text
