"""pytest plugin: memory limits and leak checks on tests (entry point ``pytest11``).

- ``@pytest.mark.torchmem_limit("512 MiB", allocation_type=None)`` fails a
  test whose peak memory, above what was live when it started, exceeds the
  limit (all tracked memory, or one allocation type: "CPU", "GPU", ...).
- ``@pytest.mark.torchmem_no_leaks(tolerance_bytes=0)`` fails a test that,
  after a garbage collection, still holds more than ``tolerance_bytes`` (an
  int or "64 KiB") it allocated (``tolerance=`` is the deprecated name).
- ``--torchmem`` enables torchmem for the whole session (every source,
  including the CUDA plugin when CUDA is present) and records every test; the
  terminal summary lists the tests with the highest peaks.

Without ``--torchmem`` (and without ``torchmem.enable()`` in the process), a
marked test is measured by its own profiler with the host tracker: CPU and
pinned tensors only. GPU limits need ``--torchmem`` (or ``torchmem.enable()``
before CUDA is first used). The measured window is the test's call phase;
tensors that exist before it (module globals, fixtures) are adopted at its
start, so they count as neither allocated nor leaked by the test. On the
global profiler, a measured test resets its peak counters.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ._events import allocating
from .analysis.sites import group_by_site, top_sites
from ._deprecation import deprecated_function, warn_deprecated
from .units import format_bytes, parse_bytes
from .sources.gc_monitor import collect_unreported

_RESULTS = pytest.StashKey[list]()


#: Deprecated alias of ``torchmem.units.parse_bytes`` (the same units table).
parse_size = deprecated_function(parse_bytes, "torchmem.pytest_plugin.parse_size",
                                 "torchmem.units.parse_bytes")


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("torchmem", "memory profiling with torchmem")
    group.addoption("--torchmem", action="store_true", default=False,
                    help="enable torchmem for the session and record every test's memory")
    group.addoption("--torchmem-top", type=int, default=10,
                    help="tests listed in the --torchmem summary (default 10)")


def pytest_configure(config: Any) -> None:
    # Registered here too, so projects that install torchmem need no config.
    config.addinivalue_line("markers", "torchmem_limit(limit, allocation_type=None): fail the "
                            "test when its peak memory exceeds limit (bytes or '512 MiB')")
    config.addinivalue_line("markers", "torchmem_no_leaks(tolerance_bytes=0): fail the test "
                            "when it leaves more than tolerance_bytes allocated")
    config.stash[_RESULTS] = []
    if config.getoption("torchmem", False):
        from . import _session

        # Early (before test modules import torch.cuda work), so the CUDA
        # plugin can still be installed.
        _session.enable(trace=False, summary=False)


def _is_pytest_frame(filename: str) -> bool:
    parts = filename.replace("\\", "/").split("/")
    return "_pytest" in parts or "pluggy" in parts


class _Measure:
    """One test's measurement window on a profiler."""

    def __init__(self, type_name: str | None, want_leaks: bool) -> None:
        from . import _session

        self.type_name = type_name
        self.want_leaks = want_leaks
        self.tracker = None
        prof = _session.get_profiler() if _session.is_enabled() else None
        if prof is None:
            from .profiler import MemoryProfiler
            from .sources.host import HostTracker

            prof = MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
            self.tracker = HostTracker(prof)
            self.own = True
        else:
            # The dispatch-mode tracker must be told of tensors from before
            # the test; the allocator hook has seen every one since enable().
            session = _session._session
            host = session.host if session is not None else None
            self.tracker = host if hasattr(host, "adopt") else None
            self.own = False
        self.prof = prof

    def start(self) -> None:
        if self.own:
            self.tracker.start()
        if self.tracker is not None:
            from .sources.host import tensors_in_gc  # torch, only once a test is measured

            self.tracker.adopt(tensors_in_gc())
        if self.want_leaks:
            collect_unreported()
        prof = self.prof
        self.start_seq = prof.next_seq
        self.base = self._current()
        prof.reset_peak(self.type_name)

    def _stats(self) -> Any:
        prof = self.prof
        return prof.get_statistics_for_type(self.type_name) if self.type_name else prof.get_statistics()

    def _current(self) -> int:
        return self._stats().current_usage_bytes

    def stop(self) -> None:
        stats = self._stats()
        self.peak = max(0, stats.peak_usage_bytes - self.base)
        if self.want_leaks:
            collect_unreported()
        live = self.prof.live_allocations()
        live = live[live["seq"] >= self.start_seq]
        if self.type_name:
            live = live[np.array([self.prof.type_name(int(t)) == self.type_name
                                  for t in live["type_id"]], dtype=bool)]
        self.leaked_rows = live
        self.leaked = int(live["size"].sum()) if len(live) else 0
        self.allocated_rows = self._allocated_rows()
        if self.own:
            self.tracker.stop()

    def _allocated_rows(self) -> np.ndarray:
        rows = self.prof.read_rows(self.start_seq)
        return rows[allocating(rows["kind"])]

    def sites_text(self, rows: np.ndarray, title: str, n: int = 5, holders: bool = False) -> str:
        usage = group_by_site(self.prof, rows)
        sites = top_sites(usage, n)
        if not sites:
            return ""
        held, search = self._holders(rows, usage, sites) if holders else ({}, None)
        lines = [title]
        for u in sites:
            lines.append(f"  {format_bytes(u.bytes):>12} in {u.count:>5} allocations  {u.site.label}")
            lines.extend(f"      held by: {h.format()}" for h in held.get(id(u), []))
            if u.site.stack is not None:
                for f in u.site.stack.frames:
                    if _is_pytest_frame(f[0]):
                        break  # the rest is pytest calling the test
                    lines.append(f'      File "{f[0]}", line {f[1]}, in {f[2]}')
        if search is not None and (search.stopped_early or search.error):
            lines.append(f"  ({search.note()})")
        return "\n".join(lines)

    def _holders(self, rows: np.ndarray, usage: dict, sites: list) -> tuple[dict, Any]:
        # Who keeps the test's leftovers alive (the test's own frame is gone by now).
        from .analysis.epoch_holders import site_holders
        from .analysis.sites import site_keys

        key_of = {id(u): k for k, u in usage.items()}
        by_key, search = site_holders(rows, site_keys(self.prof, rows),
                                      [key_of[id(u)] for u in sites], -1)
        return {id(u): by_key.get(key_of[id(u)], []) for u in sites}, search

    def close(self) -> None:
        if self.own:
            self.prof.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: Any) -> Any:
    limit_m = item.get_closest_marker("torchmem_limit")
    leak_m = item.get_closest_marker("torchmem_no_leaks")
    record = item.config.getoption("torchmem", False)
    if limit_m is None and leak_m is None and not record:
        return (yield)
    limit = type_name = None
    if limit_m is not None:
        if not limit_m.args and "limit" not in limit_m.kwargs:
            raise pytest.UsageError(f"{item.nodeid}: torchmem_limit needs a limit, e.g. "
                                    "@pytest.mark.torchmem_limit('512 MiB')")
        limit = parse_bytes(limit_m.args[0] if limit_m.args else limit_m.kwargs["limit"])
        type_name = limit_m.kwargs.get("allocation_type")
    tolerance = None
    if leak_m is not None:
        kwargs = dict(leak_m.kwargs)
        if "tolerance" in kwargs:
            warn_deprecated("torchmem_no_leaks(tolerance=...)", "torchmem_no_leaks(tolerance_bytes=...)")
            kwargs.setdefault("tolerance_bytes", kwargs.pop("tolerance"))
        tolerance = parse_bytes(leak_m.args[0] if leak_m.args else kwargs.get("tolerance_bytes", 0))
    m = _Measure(type_name, tolerance is not None)
    m.start()
    try:
        result = yield
    finally:
        m.stop()
        m.close()
        if record:
            item.config.stash[_RESULTS].append(
                (item.nodeid, m.peak, int(m.allocated_rows["size"].sum()), m.leaked))
    problems = []
    what = f"{type_name} memory" if type_name else "memory"
    if limit is not None and m.peak > limit:
        problems.append(
            f"torchmem_limit: peak {what} {format_bytes(m.peak)} ({m.peak} bytes) exceeds the "
            f"limit {format_bytes(limit)} ({limit} bytes)\n"
            + m.sites_text(m.allocated_rows, "largest allocation sites during the test:"))
    if tolerance is not None and m.leaked > tolerance:
        problems.append(
            f"torchmem_no_leaks: the test left {format_bytes(m.leaked)} ({m.leaked} bytes) in "
            f"{len(m.leaked_rows)} allocations live (tolerance {tolerance} bytes)\n"
            + m.sites_text(m.leaked_rows, "still live, by allocation site:", holders=True))
    if problems:
        pytest.fail("\n".join(problems), pytrace=False)
    return result


def pytest_terminal_summary(terminalreporter: Any, exitstatus: Any, config: Any) -> None:
    results = config.stash.get(_RESULTS, [])
    if not config.getoption("torchmem", False) or not results:
        return
    n = config.getoption("torchmem_top", 10)
    tr = terminalreporter
    tr.section("torchmem: tests by peak memory")
    for nodeid, peak, allocated, leaked in sorted(results, key=lambda r: -r[1])[:n]:
        tr.write_line(f"{format_bytes(peak):>12} peak  {format_bytes(allocated):>12} allocated  "
                      f"{format_bytes(leaked):>12} live after  {nodeid}")
