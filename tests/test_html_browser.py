"""The HTML report of a training run with attribution: its sections, and in
headless Chromium: drawn offline, hover shows a band's size, lifetime and
stack and a flame frame's stack, a click on a step shows its peak's
breakdown, wheel and drag zoom and pan the shared time axis."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch

from torchmem.analysis.categories import lifetimes
from torchmem.export import export_html
from torchmem.export._attribution_html import CATEGORY_COLORS
from torchmem.units import format_bytes

from _attribution_helpers import MLP, attributed, batches, train
from _browser import CHROMIUM, NO_CHROMIUM, chromium, open_report

needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


def count_color(png: bytes, hex_color: str, tolerance: int = 12) -> int:
    """Pixels of a screenshot within ``tolerance`` of ``hex_color`` in each channel."""
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)
    target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)], np.int16)
    return int((np.abs(rgb - target) <= tolerance).all(axis=-1).sum())


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("html-browser")
    with attributed(capture_stack_traces=True) as prof:
        train(lambda: MLP(64, 256, 10), torch.optim.Adam, batches((64, 64), 10, 4), prof)
        path = tmp / "report.html"
        export_html(prof, path)
        yield prof, path, prof.peak_report(top=5), lifetimes(prof)


def test_the_report_has_the_attribution_sections(run):
    _, path, peak, _ = run
    html = path.read_text()
    for title in ("Memory over time", "Peak", "Modules", "What was live at the peak, by stack"):
        assert f"<h2>{title}</h2>" in html
    for name in ("bands-figure", "category-figure", "steps-figure", "flame-figure"):
        assert f'"name":"{name}"' in html
    assert 'id="module-table"' in html and "<code>MLP.fc1</code>" in html
    headline = re.search(r'<p id="peak-headline"><b>(.*?)</b>', html).group(1)
    assert headline.startswith("peak ") and " at step 0, optimizer" in headline
    assert headline == peak.overall.headline().replace("&", "&amp;")
    # The hover texts hold the stacks: the training helper's own lines are there.
    assert re.search(r"_attribution_helpers\.py:\d+", html.split("</head>")[0])
    # The steps' breakdowns: the peak step's shown, every step's headline in the data.
    assert html.count('class="step-headline"') == 1
    for step in peak.steps:
        assert step.headline().replace("&", "&amp;") in html


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture
def report(browser, run):
    with open_report(browser, run[1]) as r:
        yield r


@needs_chromium
def test_drawn_offline_without_errors(browser, run, report, tmp_path):
    assert report.refused == [] and report.errors == [] and report.dialogs == []
    shot = report.page.screenshot(full_page=True)
    (tmp_path / "report.png").write_bytes(shot)
    counts = {name: count_color(shot, CATEGORY_COLORS[name])
              for name in ("parameter", "gradient", "optimizer_state", "activation")}
    # The bands, the stacked categories and the peak's bar, in each colour.
    assert min(counts.values()) > 2000, counts
    empty_tmp = tmp_path / "empty.html"
    with attributed() as prof:
        export_html(prof, empty_tmp)
    with open_report(browser, empty_tmp) as empty:
        assert empty.errors == []
        shot = empty.page.screenshot(full_page=True)
    assert all(count_color(shot, CATEGORY_COLORS[n]) == 0 for n in counts)


@needs_chromium
def test_hover_a_band_shows_its_size_lifetime_and_stack(run, report):
    prof, _, _, lt = run
    bands = report.data("bands-data")
    # Polygons: the bottom edge left to right, then the top edge back.
    b = int(np.argmax([ys[-1] - ys[0] for ys in bands["ys"]]))  # the thickest: easy to hit
    xs, ys = np.array(bands["xs"][b]), np.array(bands["ys"][b])
    half = len(xs) // 2
    x = (xs[0] + xs[half - 1]) / 2
    bottom = float(np.interp(x, xs[:half], ys[:half]))
    top = float(np.interp(x, xs[half:][::-1], ys[half:][::-1]))
    text = report.hover(*report.point("bands-figure", x, (bottom + top) / 2), ".tm-tip")
    # The allocation under the mouse: the one of that size live at x with that bottom.
    size = round(top - bottom)
    assert format_bytes(size, 1) == bands["size"][b] and bands["size"][b] in text
    i = np.flatnonzero((lt.size == size) & (lt.alloc_seq <= x) & (lt.free_seq > x))
    frames = [prof.resolve_stack(int(lt.stack_id[k])).frames for k in i]
    assert any(all(f'File "{f}", line {n}, in {fn}' in text for f, n, fn in fr[:5])
               for fr in frames), text
    assert "test_html_browser.py" in text or "_attribution_helpers.py" in text
    assert " to " in text and ("ms)" in text or "still live" in text)  # its lifetime


@needs_chromium
def test_hover_a_flame_frame_shows_its_stack(run, report):
    flame = report.data("flame-data")
    # The widest frame of the deepest row wider than 5%: its stack is a whole path.
    wide = [i for i, (a, b) in enumerate(zip(flame["left"], flame["right"])) if b - a > 0.05]
    depth = min(flame["top"][i] for i in wide)
    deepest = max((i for i in wide if flame["top"][i] == depth),
                  key=lambda i: flame["right"][i] - flame["left"][i])
    x = (flame["left"][deepest] + flame["right"][deepest]) / 2
    y = (flame["top"][deepest] + flame["bottom"][deepest]) / 2
    text = report.hover(*report.point("flame-figure", x, y), ".tm-flame-tip")
    assert flame["frame"][deepest] in text
    assert flame["stack"][deepest].splitlines()[-1] in text  # the outermost frame
    assert "of the peak's live bytes" in text


@needs_chromium
def test_click_a_step_shows_its_peak_breakdown(run, report):
    _, _, peaks, _ = run
    steps = report.data("steps-data")
    want = next(p for p in peaks.steps if p.step != peaks.overall.step)
    k = steps["step"].index(want.step)
    x = (steps["left"][k] + steps["right"][k]) / 2
    report.page.mouse.click(*report.point("steps-figure", x, 0.5))
    headline = report.page.locator("#step-breakdown .step-headline")
    headline.wait_for()
    assert headline.inner_text() == want.headline()
    cells = report.page.locator("#step-breakdown table table td").all_inner_texts()
    assert [c for c in cells if c in want.by_category] == list(want.by_category)
    assert all(m in cells for m in want.by_module)


@needs_chromium
def test_wheel_zooms_and_drag_pans_every_timeline(report):
    start, end = report.x_range("bands-figure")
    x, y = report.point("bands-figure", (start + end) / 2, 0)
    report.page.mouse.move(x, y - 40)
    report.page.mouse.wheel(0, -600)
    report.page.wait_for_timeout(300)
    z0, z1 = report.x_range("bands-figure")
    assert start <= z0 and z1 <= end and (z1 - z0) < 0.9 * (end - start)
    assert report.x_range("category-figure") == (z0, z1)  # one axis for all
    report.page.mouse.move(x, y - 40)
    report.page.mouse.down()
    report.page.mouse.move(x + 200, y - 40, steps=5)
    report.page.mouse.up()
    p0, p1 = report.x_range("bands-figure")
    assert p0 < z0 and abs((p1 - p0) - (z1 - z0)) < 1e-6 * (z1 - z0) + 1e-9
    assert report.x_range("steps-figure") == (p0, p1)
