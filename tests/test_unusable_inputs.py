"""Issue 13 item 14, the parts outside the query checks: an unusable TORCHMEM_DIR, and a
subscriber that never returns (it must not starve the others nor hold exit up silently)."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest

from torchmem import _session
from torchmem._events import EVENT_DTYPE
from torchmem.publisher import EventPublisher
from torchmem.trace import TraceDelta


@pytest.fixture
def fresh_session():
    _session._reset_for_tests()
    yield
    _session._reset_for_tests()


@pytest.mark.parametrize("make", ["a_file", "no_permission"])
def test_unusable_torchmem_dir_profiles_into_memory_with_one_warning(fresh_session, tmp_path,
                                                                     monkeypatch, make):
    if make == "a_file":
        bad = tmp_path / "not-a-dir"
        bad.write_text("x")
        target = bad / "traces"
    else:
        bad = tmp_path / "locked"
        bad.mkdir()
        bad.chmod(0o500)
        target = bad / "traces"
        import os
        if os.access(bad, os.W_OK):  # root ignores the mode
            bad.chmod(0o700)
            bad.rmdir()
            bad.write_text("x")
    monkeypatch.setenv("TORCHMEM_DIR", str(target))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p = _session.enable(summary=False, auto_snapshot=False, gc=False, host=False)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)
            and "TORCHMEM_DIR" in str(w.message)]
    assert len(said) == 1, [str(w.message) for w in caught]
    assert str(target) in said[0] and "in memory" in said[0]
    assert _session.trace_path() is None and _session.is_enabled()
    p.track_allocation(0x10, 64)
    assert p.get_statistics().total_allocated_bytes == 64


def _rows(n: int, base: int) -> np.ndarray:
    rows = np.zeros(n, dtype=EVENT_DTYPE)
    rows["address"] = base + np.arange(n)
    rows["size"] = 8
    rows["seq"] = base + np.arange(n)
    return rows


def test_a_stuck_subscriber_neither_starves_the_others_nor_holds_exit_silently(capsys):
    pub = EventPublisher()
    release = threading.Event()
    got: list[int] = []
    pub.subscribe(lambda events: release.wait())  # never returns until released
    pub.subscribe(lambda events: got.append(len(events)))
    try:
        for i in range(3):
            pub.publish_delta(TraceDelta(events=_rows(10, 100 * i)))
        deadline = time.monotonic() + 30
        while sum(got) < 30 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(got) == 30, got  # the healthy subscriber had every batch
        start = time.monotonic()
        pub.close(timeout=1.0)
        assert time.monotonic() - start < 5  # one bounded wait, not one per step
        err = capsys.readouterr().err
        assert err.count("did not return") == 1 and "<lambda>" in err, err
    finally:
        release.set()
