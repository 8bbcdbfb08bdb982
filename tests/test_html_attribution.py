"""The HTML report's attribution sections (drawn and used in Chromium: test_html_browser.py)."""

from __future__ import annotations

import re

import pytest
import torch

from torchmem.export import export_html

from _attribution_helpers import MLP, attributed, batches, train


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
    for title in ("Memory over time", "Peak", "Modules", "What was live at the peak, by stack"):
        assert f"<h2>{title}</h2>" in html
    for name in ("bands-figure", "category-figure", "steps-figure", "flame-figure"):
        assert f'"name":"{name}"' in html  # the interactive views (tests/test_html_browser.py)
    assert 'id="module-table"' in html and "<code>MLP.fc1</code>" in html
    headline = re.search(r'<p id="peak-headline"><b>(.*?)</b>', html).group(1)
    assert headline.startswith("peak ") and " at step 0, optimizer" in headline
    assert headline == peak.overall.headline().replace("&", "&amp;")
    # The flame graph's hover text holds the stacks: the test's own line is there.
    assert re.search(r"test_html_attribution\.py:\d+", html.split("</head>")[0])
    # The steps' breakdowns: the peak step's shown, every step's headline in the data.
    assert html.count('class="step-headline"') == 1
    for step in peak.steps:
        assert step.headline().replace("&", "&amp;") in html
