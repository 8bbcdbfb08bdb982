"""Holders in every report: the at-exit summary, ``torchmem leaks`` and the HTML report of a
saved trace, and the ``torchmem_no_leaks`` failure message."""

from __future__ import annotations

import html
import subprocess
import sys
import textwrap

import torch

from torchmem.analysis.epoch import epoch_records
from torchmem.analysis.epoch_records import format_record
from torchmem.cli import main
from torchmem.epoch import epoch
from torchmem.export.html import to_html
from torchmem.storage import InMemoryStorage, load
from torchmem.summary import format_summary

# The default 2 s holder budget can run out on a loaded CI machine once the
# suite has filled the heap; these tests check what the search finds.
WALK_BUDGET_S = 120.0

pytest_plugins = ["pytester"]

KEPT: list = []

SCRIPT = textwrap.dedent("""
    import torch
    from torchmem.epoch import epoch

    history = []
    for _ in range(3):
        with epoch():
            for _ in range(4):
                history.append(torch.zeros(256))  # 1 KiB a step, kept
""")


def test_summary_text_lists_the_holders(tracked):
    KEPT.clear()
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S):
            KEPT.extend(torch.zeros(64) for _ in range(3))
    text = format_summary(tracked)
    KEPT.clear()
    assert "  epoch leak check: 1 site(s) grew by 768 B in epoch 2" in text
    assert f"\n      held by: {__name__}.KEPT[5] -> Tensor  (3 allocations, 768 B)" in text


def test_a_trace_keeps_its_epoch_checks_for_leaks_and_html(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    trace = tmp_path / "run.db"
    r = subprocess.run([sys.executable, "-m", "torchmem", "run", "-o", str(trace), str(script)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prof = load(trace)
    records = epoch_records(prof)
    assert [(r["index"], r["baseline"], r["total_grown_bytes"]) for r in records] == [
        (1, True, 0), (2, False, 4096), (3, False, 4096)]
    [site] = records[-1]["sites"]
    assert site["site"].endswith("train.py:9 in <module> [CPU, host]")
    assert site["holders"] == [{"path": "__main__.history[11] -> Tensor", "held_bytes": 4096,
                                "allocation_count": 4, "root_kind": "module"}]

    assert main(["leaks", str(trace), "--top", "1"]) == 0
    out = capsys.readouterr().out
    assert "epoch leak checks: 3 in the run, 2 found growth; the last of them:" in out
    assert "\n".join(format_record(records[-1])) in out
    assert "    held by: __main__.history[11] -> Tensor  (4 allocations, 4.00 KiB)" in out
    assert "(growth also at epoch 2)" in out

    page = to_html(prof)
    assert "Epoch check 3 (the last of 2 of 3 that found growth)" in page
    assert f"<code>{html.escape('__main__.history[11] -> Tensor', quote=True)}</code>" in page
    assert '"epoch_checks"' not in page and "<td>epoch_checks</td>" not in page  # not as metadata


def test_html_of_a_live_profiler_and_a_damaged_record(tracked):
    KEPT.clear()
    for _ in range(2):
        with epoch(profiler=tracked, holders_budget_s=WALK_BUDGET_S):
            KEPT.append(torch.zeros(64))
    page = to_html(tracked)
    KEPT.clear()
    assert f"<code>{html.escape(f'{__name__}.KEPT[1] -> Tensor')}</code>" in page
    damaged = {"index": "x", "sites": [{"grown_bytes": "big", "holders": [7, {"path": 1}]}, 3]}
    assert format_record(damaged)[0] == "epoch 0: 1 allocation site(s) grew by 0 B (0 B live)"
    assert format_record(damaged)[2] == "    held by: 1  (0 allocations, 0 B)"


def test_in_memory_storage_metadata_adds_keys():
    s = InMemoryStorage()
    s.open({"a": 1})
    s.open({"b": 2, "a": 3})
    assert s.metadata == {"a": 3, "b": 2}


LEAKY_TEST = '''
import pytest
import torch

CACHE = []


@pytest.mark.torchmem_no_leaks
def test_leak_fails():
    CACHE.append(torch.ones(256))  # 1024 bytes kept
'''


def test_no_leaks_marker_names_the_holder(pytester):
    from test_pytest_plugin import ARGS

    pytester.makepyfile(test_leaky=LEAKY_TEST)
    # In a subprocess: the failed test's traceback (sys.last_traceback) would keep its
    # tensor alive in this one, and later tests count every tensor in the process.
    result = pytester.runpytest_subprocess(*ARGS, "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    line = LEAKY_TEST.lstrip("\n").splitlines().index(
        "    CACHE.append(torch.ones(256))  # 1024 bytes kept") + 1
    assert f"test_leaky.py:{line} in test_leak_fails [CPU, host]" in out
    assert "      held by: test_leaky.CACHE[0] -> Tensor  (1 allocation, 1.00 KiB)" in out
