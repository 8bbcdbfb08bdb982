"""``torchmem live TRACE``: follow a trace being written; and ``run --live``'s half of it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

from ._common import CliError, add_top_argument, add_trace_argument

__all__ = ["LiveCommand", "run_live"]

#: A file this old that holds no torchmem tables yet is not a trace about to start.
START_GRACE_S = 10.0


class LiveCommand:
    """follow a trace while it is written: a terminal view"""

    name = "live"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_trace_argument(parser)
        parser.add_argument("--interval", type=float, default=1.0,
                            help="seconds between refreshes")
        add_top_argument(parser, 10, "sites and modules shown", type=int)
        parser.add_argument("--once", action="store_true",
                            help="print the view once as text and exit")

    def run(self, args: argparse.Namespace) -> int:
        from ..live.state import LiveTrace

        trace = LiveTrace(args.trace, top=args.top)
        try:
            _check_trace(trace)
            if args.once:
                from ..live.app import render_once

                print(render_once(trace), end="")
                return 0
            from ..live.app import LiveApp

            _need_terminal()
            app = LiveApp(trace, interval_s=args.interval)
            app.run()
        finally:
            trace.close()
        if app.error:
            raise CliError(app.error)
        return 0


def _check_trace(trace: Any) -> None:
    """Raises (one line) for a file that is not a trace; a missing one is waited for."""
    figures = trace.refresh()
    path = trace.path
    if figures.state == "waiting" and os.path.isfile(path) and os.path.getsize(path) > 0 \
            and time.time() - os.path.getmtime(path) > START_GRACE_S:
        raise CliError(f"{path}: not a torchmem trace (no torchmem tables)")


def _need_terminal() -> None:
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise CliError("the live view needs a terminal (torchmem live TRACE --once prints it "
                       "as text)")


def run_live(args: argparse.Namespace, output: str) -> int:
    """``run --live``: the script runs under ``torchmem run`` in a child process, its
    output in a log file beside the trace, while the live view follows the trace
    here; returns the script's exit status."""
    from ..live.app import LiveApp
    from ..live.state import LiveTrace

    if os.path.exists(output) and not args.overwrite:
        raise CliError(f"{output} exists; use --overwrite or another -o")
    _need_terminal()
    log_path = os.path.splitext(output)[0] + ".log"
    cmd = [sys.executable, "-m", "torchmem", "run", "-o", output]
    cmd += ([] if args.stacks else ["--no-stacks"]) + (["--overwrite"] if args.overwrite else [])
    with open(log_path, "wb") as log:
        child = subprocess.Popen(cmd + [args.script, *args.args], stdin=subprocess.DEVNULL,
                                 stdout=log, stderr=subprocess.STDOUT)
    trace = LiveTrace(output)
    app = LiveApp(trace, child=child)
    try:
        app.run()
    finally:
        trace.close()
    if child.poll() is None:
        print(f"torchmem: the script goes on (pid {child.pid}); Ctrl-C stops it", file=sys.stderr)
    try:
        status = child.wait()
    except KeyboardInterrupt:  # the child got the terminal's SIGINT too
        child.send_signal(signal.SIGINT)
        status = child.wait()
    with open(log_path, "rb") as f:
        tail = f.read().decode(errors="replace").splitlines()[-20:]
    print("\n".join(tail), file=sys.stderr)
    print(f"torchmem: the script's output is in {log_path}", file=sys.stderr)
    return status if status >= 0 else 128 - status
