"""The textual application of ``torchmem live``: the panels, refreshed, and the keys.

textual (rather than rich's Live alone) because it owns the terminal
properly: raw keys without hand-written termios code, resizing, the
alternate screen restored on exit and on a crash, and it runs over ssh in
any terminal emulator. ``App.run_test`` drives it headless in the tests.
"""

from __future__ import annotations

import subprocess

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.widgets import Footer, Static

from ..storage.base import TraceFormatError
from .state import LiveFigures, LiveTrace
from .view import SITE_SORTS, header, panels

__all__ = ["LiveApp"]


class LiveApp(App):
    """Follows ``trace``; refreshes every ``interval_s`` seconds.

    ``child``, when given, is the process writing the trace (``torchmem run
    --live``): its state shows in the header. ``error`` holds the reason the
    view stopped on a bad trace (the app then exits with return code 2).
    """

    TITLE = "torchmem live"
    CSS = """
    #header { height: auto; }
    #body { height: 1fr; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit"),
        Binding("ctrl+c", "quit", "quit", show=False),
        Binding("s", "sort", "sort sites (bytes / count / name)"),
    ]

    def __init__(self, trace: LiveTrace, *, interval_s: float = 1.0,
                 child: subprocess.Popen | None = None) -> None:
        super().__init__()
        self.trace = trace
        self.interval_s = interval_s
        self.child = child
        self.order = SITE_SORTS[0]
        self.figures: LiveFigures | None = None
        self.error: str | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="header")
        with VerticalScroll(id="body"):
            yield Static(id="panels")
        yield Footer()

    def on_mount(self) -> None:
        self.refresh_figures()
        self.set_interval(self.interval_s, self.refresh_figures)

    def refresh_figures(self) -> None:
        """Reads what the trace gained and redraws."""
        try:
            self.figures = self.trace.refresh()
        except TraceFormatError as exc:
            self.error = str(exc)
            self.exit(return_code=2)
            return
        self._draw()

    def _draw(self) -> None:
        f = self.figures
        if f is None:
            return
        head = header(f)
        if self.child is not None:
            code = self.child.poll()
            head.append("\n" + (f"script running (pid {self.child.pid}); q leaves the view, "
                                "the run goes on" if code is None
                                else f"script exited with status {code}; q quits"),
                        style="bold")
        self.query_one("#header", Static).update(head)
        self.query_one("#panels", Static).update(panels(f, self.order))

    def action_sort(self) -> None:
        """Cycles the order of the site and module tables."""
        self.order = SITE_SORTS[(SITE_SORTS.index(self.order) + 1) % len(SITE_SORTS)]
        self._draw()


def render_once(trace: LiveTrace, width: int = 120) -> str:
    """One refresh of the view as plain text (``torchmem live --once``)."""
    import io

    from rich.console import Console, Group

    f = trace.refresh()
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(Group(header(f), panels(f)))
    return out.getvalue()
