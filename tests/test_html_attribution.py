"""The HTML report's attribution sections: content, and drawn in headless Chromium."""

from __future__ import annotations

import re

import pytest
import torch

from torchmem.export import export_html
from torchmem.export._attribution_html import CATEGORY_COLORS

from _attribution_helpers import MLP, attributed, batches, train
from test_html_screenshot import CHROMIUM, _count_color, _screenshot


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("attribution-html")
    with attributed(capture_stack_traces=True) as prof:
        train(lambda: MLP(64, 256, 10), torch.optim.Adam, batches((64, 64), 10, 4), prof)
        path = tmp / "report.html"
        export_html(prof, path)
        peak = prof.peak_report()
    return tmp, path, path.read_text(), peak


def test_the_report_has_the_attribution_sections(report):
    _, _, html, peak = report
    for title in ("Memory over time by category", "Peak", "Modules",
                  "What was live at the peak, by stack"):
        assert f"<h2>{title}</h2>" in html
    assert 'id="category-chart"' in html and 'id="flame-graph"' in html
    assert 'id="module-table"' in html and "<code>MLP.fc1</code>" in html
    headline = re.search(r'<p id="peak-headline"><b>(.*?)</b>', html).group(1)
    assert headline.startswith("peak ") and " at step 0, optimizer" in headline
    assert headline == peak.overall.headline().replace("&", "&amp;")
    # Hovering a frame shows its stack: the test's own line is in a tooltip.
    assert re.search(r"<title>[^<]*test_html_attribution\.py:\d+[^<]*</title>", html)
    assert "<script" not in html


@pytest.mark.skipif(CHROMIUM is None, reason="Debian chromium not installed "
                    "(scripts/install-chromium.sh)")
def test_the_attribution_sections_are_drawn(report):
    tmp, path, html, _ = report
    # The chart and the flame graph alone, so the screenshot shows them.
    start = html.index("<h2>Memory over time by category</h2>")
    end = html.index("<h2>", html.index("<h2>What was live at the peak, by stack</h2>") + 5)
    head = html[:html.index("<body>") + 6]
    page = tmp / "sections.html"
    page.write_text(head + html[start:end] + "</body></html>")
    shot = _screenshot(tmp, page, "sections")
    counts = {name: _count_color(shot, CATEGORY_COLORS[name], tolerance=12)
              for name in ("parameter", "gradient", "optimizer_state", "activation")}
    # Bands of the chart and the peak's stacked bar.
    assert min(counts.values()) > 200, counts
