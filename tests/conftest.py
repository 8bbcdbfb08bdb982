import pytest

import torchmem


@pytest.fixture
def profiler():
    """A fresh profiler without background snapshots (exact event lists)."""
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()


@pytest.fixture
def tracked():
    """A profiler with stacks and the host tracker on this thread."""
    from torchmem.sources.host import HostTracker

    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    tracker = HostTracker(p).start()
    try:
        yield p
    finally:
        tracker.stop()
        p.close()


def pytest_sessionstart(session):
    # Attribution's C++ node hooks build on a background thread at the first
    # ContextSource start, into the cache directory of that moment: start it
    # here, before a test points TORCHMEM_CACHE_DIR at a temporary directory.
    from torchmem.sources.context import build_autograd_hooks

    build_autograd_hooks()
