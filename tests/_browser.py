"""Headless Chromium for the HTML report's tests, through Playwright (its own
browser download is never used: Debian's chromium, scripts/install-chromium.sh).

``open_report(browser, path)`` loads a report with every request leaving the file
refused and recorded, waits until Bokeh has drawn it, and yields a Report:
the page, the refused requests, the script errors, and helpers that turn a
figure's data coordinates into page pixels.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterator

CHROMIUM = next((c for c in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if c and os.path.exists(c)),
                None)
NO_CHROMIUM = "Debian chromium not installed (scripts/install-chromium.sh)"

IDLE = "() => window.Bokeh && Bokeh.documents.length > 0 && Bokeh.documents[0].is_idle"
# The view of the figure named `name` (a depth-first walk of the root views).
_FIND = """(name) => { for (const root of Object.values(Bokeh.index)) { const st = [root];
  while (st.length) { const v = st.pop(); if (v.model.name === name) return v;
    if (v.child_views) st.push(...v.child_views); } } return null; }"""


@dataclass
class Report:
    page: Any
    cdp: Any = None
    refused: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def busy_s(self) -> dict[str, float]:
        """Chromium's own figures for the page so far (seconds): TaskDuration (the
        main thread busy), ScriptDuration, LayoutDuration; less noisy than the
        wall clock on a loaded machine."""
        metrics = self.cdp.send("Performance.getMetrics")["metrics"]
        return {m["name"]: m["value"] for m in metrics
                if m["name"] in ("TaskDuration", "ScriptDuration", "LayoutDuration")}

    def data(self, source: str) -> dict[str, Any]:
        """The columns of the ColumnDataSource named ``source``."""
        return self.page.evaluate(
            """(name) => { const d = Bokeh.documents[0].get_model_by_name(name).data;
               const out = {}; for (const k of Object.keys(d)) out[k] = Array.from(d[k],
               (v) => (v && v.length !== undefined && typeof v !== "string") ? Array.from(v) : v);
               return out; }""", source)

    def point(self, figure: str, x: float, y: float) -> tuple[float, float]:
        """Viewport pixels of data point (x, y) of the figure named ``figure``,
        scrolled into view first."""
        return tuple(self.page.evaluate(
            f"""([name, x, y]) => {{ const v = ({_FIND})(name);
                v.el.scrollIntoView({{block: "center", behavior: "instant"}});
                const r = v.el.getBoundingClientRect();
                return [r.left + v.frame.x_scale.compute(x), r.top + v.frame.y_scale.compute(y)];
            }}""", [figure, x, y]))

    def x_range(self, figure: str) -> tuple[float, float]:
        return tuple(self.page.evaluate(
            f"""(name) => {{ const v = ({_FIND})(name);
                return [v.model.x_range.start, v.model.x_range.end]; }}""", figure))

    def hover(self, x: float, y: float, selector: str) -> str:
        """Moves the mouse to (x, y) page pixels and returns the text of the
        tooltip element matching ``selector`` (Bokeh draws it in a shadow root,
        which Playwright's locators enter)."""
        self.page.mouse.move(x - 3, y - 3)
        self.page.mouse.move(x, y)
        tip = self.page.locator(selector).first
        tip.wait_for(state="visible", timeout=10_000)
        return tip.inner_text()


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright Browser) for open_report."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM,
                                     args=["--no-sandbox", "--disable-gpu"])
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def open_report(browser: Any, path: os.PathLike, width: int = 1200, height: int = 900
                ) -> Iterator[Report]:
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")
        report = Report(page, cdp)

        def route(r: Any) -> None:
            if r.request.url.startswith("file://"):
                r.continue_()
            else:
                report.refused.append(r.request.url)
                r.abort()

        page.route("**/*", route)
        page.on("pageerror", lambda e: report.errors.append(str(e)))
        page.on("console", lambda m: report.errors.append(m.text) if m.type == "error"
                else None)
        page.on("dialog", lambda d: (report.dialogs.append(d.message), d.dismiss()))
        page.goto(f"file://{os.fspath(path)}")
        page.wait_for_function(IDLE, timeout=60_000)
        yield report
    finally:
        page.close()
