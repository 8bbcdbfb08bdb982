"""`torchmem live` and `torchmem run --live`: the view's figures against the profiler's.

Headless (textual's run_test, and --once) for the logic; in a real terminal
(tmux: keys sent, the pane captured) on a trace that a running script is
writing, for what a user sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

import torchmem
from torchmem import cli
from torchmem.units import format_bytes
from torchmem.live.app import LiveApp
from torchmem.live.state import LiveTrace

# The script writes its own profiler's figures at two moments and waits for
# the test between them, so the screen can be compared with them at rest.
SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    import torchmem

    def figures(prof):
        prof.flush()
        prof.storage.flush()  # committed: a reader sees all of it
        stats = prof.get_statistics()
        return {"current": stats.current_usage_bytes, "peak": stats.peak_usage_bytes,
                # The trace knows the steps its events carry: the view shows
                # the latest event's, not a step() made since.
                "step": prof.current_step, "event_step": int(prof.get_event_rows()["step"][-1]),
                "gc": len(prof.gc_records),
                "pairs": [[t, d, c.current_bytes, c.peak_bytes]
                          for (t, d), c in prof.counters_by_type_and_device().items()]}

    def wait_for(name):
        while not os.path.exists(name):
            time.sleep(0.05)

    def dump(name, value):  # whole or not at all: the test reads it as soon as it exists
        with open(name + ".tmp", "w") as f:
            json.dump(value, f)
        os.replace(name + ".tmp", name)

    prof = torchmem.enable(trace_dir=".", summary=False, auto_snapshot=False)
    dump("trace.txt", torchmem.trace_path())
    held = [torch.zeros(12345), torch.zeros(12345), torch.zeros(12345)]  # HELD
    torchmem.mark_epoch()
    for _ in range(4):
        scratch = torch.ones(50000)
        del scratch
        prof.step()
    dump("one.json", figures(prof))
    wait_for("go")
    more = [torch.zeros(777), torch.zeros(777), torch.zeros(777), torch.zeros(777), torch.zeros(777)]  # MORE
    result = torchmem.mark_epoch()
    dump("two.json", dict(figures(prof), grown=result.total_grown_bytes))
    wait_for("go2")
""")


def _line_of(marker: str) -> int:
    return next(i for i, text in enumerate(SCRIPT.splitlines(), 1) if text.endswith(marker))


def _wait_file(path, timeout=120.0, proc=None):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the script exited ({proc.returncode}) before {path}")
        if time.monotonic() > deadline:
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.1)
    time.sleep(0.05)
    with open(path) as f:
        return f.read()


def _exact(n: int) -> str:
    return f"{format_bytes(n)} ({n:,} B)"


# -- headless --------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_trace(tmp_path_factory):
    """A trace of the script run to its end (the test lets it through both waits)."""
    tmp_path = tmp_path_factory.mktemp("finished")
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "go").write_text("")
    (tmp_path / "go2").write_text("")
    subprocess.run([sys.executable, "script.py"], cwd=tmp_path, check=True, timeout=300,
                   capture_output=True)
    two = json.loads((tmp_path / "two.json").read_text())
    return json.loads((tmp_path / "trace.txt").read_text()), two


def test_once_prints_the_profilers_figures(finished_trace, capsys, monkeypatch):
    path, two = finished_trace
    monkeypatch.chdir(os.path.dirname(path))  # sites under the current directory: relative
    assert cli.main(["live", path, "--once"]) == 0
    out = capsys.readouterr().out
    assert f"live {_exact(two['current'])}  peak {_exact(two['peak'])}" in out
    ((t, d, cur, peak),) = two["pairs"]
    assert (t, d) == ("CPU", -1)
    row = next(line for line in out.splitlines() if line.startswith("│ CPU"))
    assert [c.strip() for c in row.strip("│").split("│")] == ["CPU", "host", _exact(cur),
                                                             _exact(peak)]
    held = next(line for line in out.splitlines() if f"script.py:{_line_of('# HELD')}" in line)
    assert [c.strip() for c in held.strip("│").split("│")][:2] == [format_bytes(3 * 12345 * 4),
                                                                 "3"]
    assert f"last epoch check: epoch 2 at step {two['step']}: 1 site(s) grew by " \
           f"{format_bytes(two['grown'])}" in out
    assert "[finished]" in out


def test_the_app_sorts_and_quits_on_its_keys(finished_trace):
    path, two = finished_trace

    async def drive():
        app = LiveApp(LiveTrace(path), interval_s=0.2)
        async with app.run_test(size=(160, 50)) as pilot:
            await pilot.pause()
            assert app.figures.current_bytes == two["current"]
            assert app.figures.peak_bytes == two["peak"]
            assert app.figures.step == two["event_step"]
            orders = [app.order]
            for _ in range(3):
                await pilot.press("s")
                orders.append(app.order)
            assert orders == ["bytes", "count", "name", "bytes"]
            await pilot.press("q")
        return app

    app = asyncio.run(drive())
    assert app.return_code in (0, None) and app.error is None


def test_a_file_that_is_not_a_trace_is_one_line(tmp_path, capsys):
    bad = tmp_path / "notes.db"
    bad.write_text("not sqlite " * 50)
    assert cli.main(["live", str(bad), "--once"]) == 2
    assert capsys.readouterr().err.strip() == \
        f"torchmem: error: {bad}: not a torchmem trace (not an SQLite database)"


def test_without_a_terminal_the_view_says_so(tmp_path, capsys):
    # pytest's stdin and stdout are not terminals
    assert cli.main(["live", str(tmp_path / "later.db")]) == 2
    assert "the live view needs a terminal" in capsys.readouterr().err
    (tmp_path / "job.py").write_text("print(1)\n")
    assert cli.main(["run", "--live", "-o", str(tmp_path / "j.db"), str(tmp_path / "job.py")]) == 2
    assert not (tmp_path / "j.db").exists()


def test_waiting_for_a_trace_that_does_not_exist_yet(tmp_path, capsys):
    assert cli.main(["live", str(tmp_path / "later.db"), "--once"]) == 0
    assert f"waiting for {tmp_path / 'later.db'}" in capsys.readouterr().out


# -- in a real terminal -------------------------------------------------------------
class Tmux:
    """One tmux server of our own (its own socket), one window of a known size."""

    def __init__(self, name: str, cwd, command: str, width=220, height=60) -> None:
        self.base = ["tmux", "-L", name]
        # The pane's size, not a COLUMNS / LINES the test process may carry.
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        subprocess.run(self.base + ["new-session", "-d", "-s", "t", "-x", str(width), "-y",
                                    str(height), "-c", str(cwd), command], check=True, env=env)

    def screen(self) -> str:
        return subprocess.run(self.base + ["capture-pane", "-p", "-t", "t"], check=True,
                              capture_output=True, text=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "t", *keys], check=True)

    def wait_for(self, *texts: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if all(t in screen for t in texts):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"not on screen after {timeout} s: "
                                     f"{[t for t in texts if t not in screen]}\n{screen}")
            time.sleep(0.2)

    def close(self) -> None:
        socket = subprocess.run(self.base + ["display-message", "-p", "-t", "t",
                                             "#{socket_path}"],
                                capture_output=True, text=True).stdout.strip()
        subprocess.run(self.base + ["kill-server"], capture_output=True)
        if socket and os.path.exists(socket):  # tmux leaves it behind
            os.remove(socket)


@pytest.fixture
def tmux(tmp_path):
    if shutil.which("tmux") is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing (.ci/run installs it)")
        pytest.skip("tmux is not installed")
    made = []

    def start(command: str) -> Tmux:
        t = Tmux(f"torchmem-test-{os.getpid()}-{len(made)}", tmp_path, command)
        made.append(t)
        return t

    yield start
    for t in made:
        t.close()


def _cells(screen: str, first: str) -> list[str]:
    line = next(x for x in screen.splitlines() if x.startswith(first))
    return [c.strip() for c in line.strip().strip("│").split("│")]


def test_live_follows_a_running_script_in_tmux(tmp_path, tmux):
    (tmp_path / "script.py").write_text(SCRIPT)
    script = subprocess.Popen([sys.executable, "script.py"], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        one = json.loads(_wait_file(tmp_path / "one.json", proc=script))
        trace = json.loads(_wait_file(tmp_path / "trace.txt", proc=script))
        term = tmux(f"{sys.executable} -m torchmem live {trace}; echo LIVE-EXIT=$?; sleep 600")
        held = f"script.py:{_line_of('# HELD')} in <module> [CPU, host]"
        screen = term.wait_for(f"live {_exact(one['current'])}  peak {_exact(one['peak'])}",
                               f"step {one['event_step']} ", held, "[following]",
                               "last epoch check: epoch 1 at step 0: baseline")
        ((t, d, cur, peak),) = one["pairs"]
        assert _cells(screen, "│ CPU") == ["CPU", "host", _exact(cur), _exact(peak)]
        assert _cells(screen, f"│ {format_bytes(3 * 12345 * 4)}")[1:] == ["3", held]  # relative
        assert "last epoch check: epoch 1 at step 0: baseline" in screen
        # The script goes on: five more tensors and a second epoch check.
        (tmp_path / "go").write_text("")
        two = json.loads(_wait_file(tmp_path / "two.json", proc=script))
        more = f"script.py:{_line_of('# MORE')} in <module> [CPU, host]"
        screen = term.wait_for(f"live {_exact(two['current'])}", more,
                               f"last epoch check: epoch 2 at step {two['step']}: 1 site(s) "
                               f"grew by {format_bytes(two['grown'])}")
        assert two["grown"] == 5 * 777 * 4
        assert "sorted by bytes" in screen
        # s: by allocation count, the five small tensors first.
        term.keys("s")
        screen = term.wait_for("sorted by count")
        sites = [line for line in screen.splitlines() if "script.py:" in line]
        assert more in sites[0] and held in sites[1]
        term.keys("q")
        term.wait_for("LIVE-EXIT=0", timeout=20)
        (tmp_path / "go2").write_text("")
        assert script.wait(timeout=60) == 0
    finally:
        script.kill()


RUN_SCRIPT = textwrap.dedent("""
    import os, time
    import torch
    print("hello from the script")
    held = [torch.zeros(4321), torch.zeros(4321)]
    while not os.path.exists("go"):
        time.sleep(0.05)
    print("the script is done")
""")


def test_run_live_shows_the_script_then_its_summary(tmp_path, tmux):
    (tmp_path / "job.py").write_text(RUN_SCRIPT)
    term = tmux(f"{sys.executable} -m torchmem run --live -o job.db job.py; echo RUN-EXIT=$?; "
                "sleep 600")
    held = "job.py:5 in <module> [CPU, host]"
    term.wait_for("script running (pid", held, "[following]")
    (tmp_path / "go").write_text("")
    term.wait_for("script exited with status 0; q quits", "[finished]")
    term.keys("q")
    screen = term.wait_for("RUN-EXIT=0", timeout=30)
    assert "torchmem: the script's output is in job.log" in screen
    assert "trace written to job.db" in screen  # the run's summary, after the view
    log = (tmp_path / "job.log").read_text()
    assert "hello from the script" in log and "the script is done" in log
    assert torchmem.load(tmp_path / "job.db").get_statistics().allocation_count >= 2
