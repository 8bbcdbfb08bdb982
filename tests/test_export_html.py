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
    assert EVIL not in text and "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "<b>x</b>" not in text and "T&lt;b&gt;x&lt;/b&gt;" in text
    p.close()


def test_report_sections_and_offline(tmp_path):
    p = _evil_profiler()
    text = to_html(p, title="run <1>")
    p.close()
    for section in ("Memory over time by type", "Top allocation sites", "Potential leaks",
                    "GC pauses", "Snapshots", "Out-of-memory errors", "Summary"):
        assert f"<h2>{section}</h2>" in text
    assert "<title>run &lt;1&gt;</title>" in text
    # Self-contained: no external fetches of any kind.
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", text)
    assert text.count('class="series"') == 5  # total + CPU, GPU, Pinned, T<b>x</b>
    assert text.count('class="marker"') == 3  # steps 1, 2, 3 start
    assert "1.0 GiB" in text  # the OOM request
    assert "unavailable" in text or "used" in text  # NVML column of the snapshot


def test_empty_profiler_report():
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    text = to_html(p)
    p.close()
    assert "No allocation events" in text and 'class="series"' not in text
