"""The HTML report renders in headless Chromium and its chart is drawn."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import zlib

import pytest

import torchmem
from torchmem.export import export_html
from torchmem.export._svg import COLORS

from _trace_helpers import make_workload

CHROMIUM = next((c for c in ("/usr/bin/chromium", shutil.which("chromium") or "",
                             shutil.which("chromium-browser") or "") if c and os.path.exists(c)),
                None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="Debian chromium not installed (scripts/install-chromium.sh)")


def _png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """Rows of RGB(A) bytes of an 8-bit, non-interlaced PNG (what Chromium writes)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if ctype == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and interlace == 0 and color in (2, 6)
            bpp = 3 if color == 2 else 4
        elif ctype == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * bpp, [], bytearray(width * bpp)
    for y in range(height):
        f, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, bpp, rows


def _count_color(png: bytes, hex_color: str, tolerance: int = 40) -> int:
    target = tuple(int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    width, bpp, rows = _png_pixels(png)
    n = 0
    for row in rows:
        for x in range(width):
            px = row[x * bpp:x * bpp + 3]
            if all(abs(px[k] - target[k]) <= tolerance for k in range(3)):
                n += 1
    return n


def _screenshot(tmp_path, html_path, name):
    shot = tmp_path / f"{name}.png"
    profile = tmp_path / f"chrome-{name}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
           "--window-size=1100,700", "--hide-scrollbars", f"file://{html_path}"]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    return shot.read_bytes()


def _report(tmp_path, name, workload):
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    if workload:
        make_workload(p)
    path = tmp_path / f"{name}.html"
    export_html(p, path)
    p.close()
    return path


def test_chart_is_drawn(tmp_path):
    drawn = _screenshot(tmp_path, _report(tmp_path, "full", True), "full")
    empty = _screenshot(tmp_path, _report(tmp_path, "empty", False), "empty")
    # The "total" series colour: hundreds of pixels when the line is drawn,
    # none in the same report without events (nothing else uses that colour).
    assert _count_color(drawn, COLORS[0]) > 300
    assert _count_color(empty, COLORS[0]) == 0
    assert _count_color(drawn, COLORS[1]) > 100  # the second series (a type) too
