"""The live view's panels as rich renderables (the textual app shows them; ``--once`` prints them)."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from ..analysis.epoch_records import int_field
from ..units import format_bytes
from .state import LiveFigures

__all__ = ["SITE_SORTS", "header", "panels", "short_site", "sort_sites"]

#: The orders the site and module tables cycle through ("s" in the app).
SITE_SORTS = ("bytes", "count", "name")


def _exact(n: int) -> str:
    return f"{format_bytes(n)} ({n:,} B)"


def _where(device: int) -> str:
    return "host" if device < 0 else f"device {device}"


def short_site(label: str, cwd: str | None = None) -> str:
    """``label`` with the current directory taken off a path under it (``train.py:12 ...``)."""
    prefix = (cwd or os.getcwd()).rstrip(os.sep) + os.sep
    return label[len(prefix):] if label.startswith(prefix) else label


def sort_sites(sites: list[tuple[str, int, int]], order: str) -> list[tuple[str, int, int]]:
    """``sites`` (label, bytes, count) by bytes or count (largest first) or by name."""
    if order == "count":
        return sorted(sites, key=lambda s: (-s[2], -s[1], s[0]))
    if order == "name":
        return sorted(sites, key=lambda s: s[0])
    return sorted(sites, key=lambda s: (-s[1], -s[2], s[0]))


def _program(argv0: str) -> str:
    name = os.path.basename(argv0)
    # python -m torchmem run ...: argv[0] is the package's __main__.py
    return "torchmem" if name == "__main__.py" and "torchmem" in argv0 else name


def header(f: LiveFigures) -> Text:
    """Two lines: what is followed and how far, then the totals."""
    rate = "-" if f.steps_per_second is None else f"{f.steps_per_second:.2f}"
    argv = " ".join(_program(a) if i == 0 else a for i, a in enumerate(f.argv))
    line1 = (f"torchmem live  {f.path}  [{f.state}]  step {f.step:,}  {rate} steps/s  "
             f"events {f.events:,}" + (f"  run: {argv}" if argv else ""))
    line2 = (f"live {_exact(f.current_bytes)}  peak {_exact(f.peak_bytes)}  allocated "
             f"{format_bytes(f.allocated_bytes)} in {f.allocation_count:,} allocations")
    if f.ooms:
        line2 += f"  OUT OF MEMORY x{f.ooms}"
    if f.anomalies:
        line2 += f"  anomalies {f.anomalies:,}"
    return Text(line1 + "\n" + line2)


def _types_table(f: LiveFigures) -> Table:
    t = Table(title="memory by type and device", title_justify="left", expand=True)
    for name in ("type", "device", "live", "peak"):
        t.add_column(name, justify="left" if name in ("type", "device") else "right")
    for r in f.by_type_device:
        t.add_row(r.allocation_type, _where(r.device), _exact(r.current_bytes),
                  _exact(r.peak_bytes))
    return t


def _sites_table(f: LiveFigures, order: str) -> Table:
    t = Table(title=f"top sites by live bytes (sorted by {order}; s: sort)",
              title_justify="left", expand=True)
    t.add_column("live", justify="right")
    t.add_column("allocations", justify="right")
    t.add_column("site", overflow="fold", ratio=1)
    for label, nbytes, count in sort_sites(f.sites, order):
        t.add_row(format_bytes(nbytes), f"{count:,}", short_site(label))
    return t


def _modules_panel(f: LiveFigures, order: str) -> Any:
    if f.modules is None:
        return Text("modules: this trace has no module attribution", style="dim")
    t = Table(title="top modules by live bytes", title_justify="left", expand=True)
    t.add_column("live", justify="right")
    t.add_column("module", ratio=1)
    rows = f.modules if order != "name" else sorted(f.modules)
    for name, nbytes in rows:
        t.add_row(format_bytes(nbytes), name)
    return t


def _gc_text(f: LiveFigures) -> Text:
    if not f.gc_count:
        return Text("GC: no collection yet")
    last = ", ".join(f"gen {r.generation} {r.duration_ns / 1e6:.1f} ms at step {r.step}"
                     for r in f.gc_last)
    longest = f.gc_longest
    text = (f"GC: {f.gc_count:,} collections, {f.gc_time_ns / 1e6:.1f} ms in total; "
            f"last: {last}")
    if longest is not None:
        text += (f"; longest: gen {longest.generation} {longest.duration_ns / 1e6:.1f} ms "
                 f"at step {longest.step}")
    return Text(text)


def _epoch_text(f: LiveFigures) -> Text:
    e = f.epoch_check
    if e is None:
        return Text("last epoch check: none yet (torchmem.epoch / mark_epoch / a callback)")
    head = f"last epoch check: epoch {e.get('index')} at step {e.get('step')}: "
    if e.get("baseline"):
        return Text(head + f"baseline ({format_bytes(int_field(e.get('live_bytes')))} live)")
    sites = [s for s in e.get("sites") or [] if isinstance(s, dict)]
    if not sites:
        return Text(head + f"no site grew ({format_bytes(int_field(e.get('live_bytes')))} live)")
    lines = [head + f"{e.get('site_count', len(sites))} site(s) grew by "
             f"{format_bytes(int_field(e.get('total_grown_bytes')))}"]
    for site in sites[:3]:
        lines.append(f"  +{format_bytes(int_field(site.get('grown_bytes')))}  "
                     f"{short_site(str(site.get('site')))}")
        holders = [h for h in site.get("holders") or [] if isinstance(h, dict)]
        if holders:
            lines.append(f"      held by {holders[0].get('path')}")
    return Text("\n".join(lines), style="bold red")


def panels(f: LiveFigures, order: str = "bytes") -> Group:
    """Everything below the header, top to bottom."""
    if f.state == "waiting":
        return Group(Text(f"waiting for {f.path} (the trace starts when the run enables "
                          "torchmem)"))
    return Group(_types_table(f), _sites_table(f, order), _modules_panel(f, order),
                 Panel(Group(_gc_text(f), _epoch_text(f)), expand=True))
