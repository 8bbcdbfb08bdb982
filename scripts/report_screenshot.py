"""Writes docs/images/html-report.png: the HTML report of examples/attribution_cpu.py
in headless Chromium, with the mouse on the largest band so its tooltip shows.

    python scripts/report_screenshot.py [REPORT.html] [OUT.png]

Without REPORT, runs the example (a few seconds on CPU) in a temporary directory.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _browser import chromium, open_report  # noqa: E402


def main() -> None:
    report = sys.argv[1] if len(sys.argv) > 1 else None
    out = sys.argv[2] if len(sys.argv) > 2 else os.path.join(HERE, "..", "docs", "images",
                                                             "html-report.png")
    if report is None:
        tmp = tempfile.mkdtemp(prefix="torchmem-shot-")
        subprocess.run([sys.executable, os.path.join(HERE, "..", "examples", "attribution_cpu.py"),
                        "--trace-dir", tmp], check=True, stdout=subprocess.DEVNULL)
        report = glob.glob(os.path.join(tmp, "*.html"))[0]
    with chromium() as browser, open_report(browser, report, width=1200, height=1000) as r:
        bands = r.data("bands-data")
        b = int(np.argmax([ys[-1] - ys[0] for ys in bands["ys"]]))
        xs, ys = np.array(bands["xs"][b]), np.array(bands["ys"][b])
        half = len(xs) // 2
        x = xs[0] + (xs[half - 1] - xs[0]) * 0.3
        low = float(np.interp(x, xs[:half], ys[:half]))
        high = float(np.interp(x, xs[half:][::-1], ys[half:][::-1]))
        r.page.evaluate("window.scrollTo(0, 0)")
        px, py = r.point("bands-figure", x, (low + high) / 2)
        r.page.evaluate("window.scrollTo(0, 0)")
        px, py = r.point("bands-figure", x, (low + high) / 2)
        r.hover(px, py, ".tm-tip")
        r.page.screenshot(path=out, clip={"x": 0, "y": 0, "width": 1200, "height": 1000})
    print(out)


if __name__ == "__main__":
    main()
