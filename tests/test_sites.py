"""One allocation site for every report: the user's line, never torch's linear.py.

The workload keeps the output of ``model(x)`` each step; the memory is
allocated inside ``torch/nn/modules/linear.py``, called from the line marked
SITE below. The summary, the HTML report, ``torchmem diff``, the epoch check,
the OOM report and ``torchmem leaks`` must all name that line, the same way.
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import torchmem
from torchmem.analysis.sites import NO_STACK, Site, site_name, user_frame
from torchmem.analysis.summary import allocation_sites
from torchmem.cli import main
from torchmem.export import to_html
from torchmem.sources.host import HostTracker
from torchmem.storage import SQLiteStorage, load
from torchmem.summary import format_summary

# The model lives only while these tests run: other modules measure every
# CPU tensor reachable from Python.
NET: dict = {}


@pytest.fixture(autouse=True, scope="module")
def net():
    torch.manual_seed(0)
    NET["model"] = torch.nn.Linear(64, 2048)  # outputs of 64 KiB: they top every list
    NET["x"] = torch.randn(8, 64)
    yield
    NET.clear()


def grow(profiler, steps, keep):
    model, x = NET["model"], NET["x"]
    for _ in range(steps):
        keep.append(model(x))  # SITE
        profiler.step()


def _site_line() -> int:
    with open(__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith("# SITE"))


SITE = f"{os.path.abspath(__file__)}:{_site_line()} in grow"


def _profile(steps, storage=None):
    p = torchmem.MemoryProfiler(storage, auto_snapshot=False, capture_stack_traces=True)
    keep: list = []
    tracker = HostTracker(p).start()
    try:
        grow(p, steps, keep)
    finally:
        tracker.stop()
    return p, keep


@pytest.fixture
def live():
    p, keep = _profile(4)
    yield p
    del keep
    p.close()


def _trace(tmp_path, name, steps):
    path = tmp_path / name
    p, keep = _profile(steps, SQLiteStorage(path))
    p.close()
    return path, keep


def test_the_site_is_the_users_line_not_torchs():
    stack = torchmem.StackTrace((
        (os.path.join(os.path.dirname(torch.__file__), "nn", "modules", "linear.py"), 125,
         "forward"),
        (os.path.join(os.path.dirname(torchmem.__file__), "profiler.py"), 1, "track"),
        ("/home/me/train.py", 12, "step"),
        ("/home/me/train.py", 40, "<module>")))
    assert user_frame(stack) == ("/home/me/train.py", 12, "step")
    assert site_name(stack) == "/home/me/train.py:12 in step"
    # A trace made with another installation: its torch is recognised by path.
    other = torchmem.StackTrace((("/opt/venv/lib/python3.11/site-packages/torch/nn/functional.py",
                                  9, "linear"), ("/srv/job.py", 3, "run")))
    assert site_name(other) == "/srv/job.py:3 in run"
    # Only torch's frames: the innermost is all there is to name.
    only_torch = torchmem.StackTrace(stack.frames[:1])
    assert site_name(only_torch).endswith("linear.py:125 in forward")
    assert site_name(None) == NO_STACK
    assert Site(1, "CPU", -1, stack).label == "/home/me/train.py:12 in step [CPU, host]"
    assert Site(0, "GPU", 3).label == f"GPU on device 3 {NO_STACK}"


def test_the_allocations_really_are_made_inside_torch(live):
    [(site, nbytes, count)] = [s for s in allocation_sites(live, 10)
                               if s[0].name == SITE]
    assert "linear.py" in site.stack.frames[0][0]  # the innermost frame is torch's
    # The 4 kept outputs, and the parameters the dispatch tracker adopts there.
    assert nbytes >= 4 * 8 * 2048 * 4 and count >= 4


def test_summary_names_the_users_line(live):
    text = format_summary(live)
    assert SITE in text
    assert "linear.py" not in text


def test_html_report_names_the_users_line(live):
    html = to_html(live)
    sites = re.findall(r"<summary><code>([^<]*)</code></summary>", html)
    assert sites and sites[0] == SITE
    assert not any("linear.py" in s for s in sites)
    assert f"<code>{SITE}</code>" in html  # the leak table's site column too


def test_epoch_check_names_the_users_line():
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    keep: list = []
    tracker = HostTracker(p).start()
    try:
        NET["model"](NET["x"])  # the tracker adopts the parameters when it first sees them
        torchmem.mark_epoch(p)
        grow(p, 3, keep)
        result = torchmem.mark_epoch(p)
    finally:
        tracker.stop()
        p.close()
    [leak] = [g for g in result.leaks if g.site.name == SITE]
    assert leak.grown_bytes == 3 * 8 * 2048 * 4
    assert f"{SITE} [CPU, host]" in result.report()
    assert "linear.py" not in leak.format(with_stack=False)


def test_oom_report_names_the_users_line(live, tmp_path):
    live.record_oom(1 << 30, -1)
    rep = torchmem.oom.write_report(live, directory=str(tmp_path), quiet=True)
    assert rep.data["sites"][0].site.name == SITE
    assert f"{SITE} [CPU, host]" in rep.text
    assert f"{SITE} [CPU, host]" in open(rep.html_path).read()


def test_cli_leaks_and_diff_name_the_users_line(tmp_path, capsys):
    a, keep_a = _trace(tmp_path, "a.db", 2)
    b, keep_b = _trace(tmp_path, "b.db", 5)
    assert main(["leaks", str(b), "--top", "3"]) == 0
    out = capsys.readouterr().out
    heads = [line for line in out.splitlines() if " at 0x" in line]
    assert heads and all(line.endswith(SITE) for line in heads)
    assert main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith(SITE)]
    assert "+192.0 KiB" in row  # 3 more kept outputs of 64 KiB
    assert "linear.py" not in out
    assert load(b).get_statistics().current_usage_bytes >= 5 * 8 * 2048 * 4
