import pytest

import torchmem


@pytest.fixture
def profiler():
    """A fresh profiler without background snapshots (exact event lists)."""
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    yield p
    p.close()
