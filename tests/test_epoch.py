"""The epoch leak check: a leak caught at epoch 2 with its site and bytes, and
a clean training loop that reports nothing over 20 epochs."""

from __future__ import annotations

import os
import sys

import pytest
import torch

import torchmem
from torchmem.analysis.sites import user_frame
from torchmem.epoch import LeakError, epoch, mark_epoch

EXAMPLES = os.path.join(os.path.dirname(__file__), os.pardir, "examples")
sys.path.insert(0, os.path.abspath(EXAMPLES))
import leaky_loop  # noqa: E402


def _leak_line() -> int:
    with open(leaky_loop.__file__) as f:
        return next(i for i, line in enumerate(f, 1) if line.rstrip().endswith("# LEAK"))


def test_leaking_example_is_caught_at_epoch_2_with_site_and_bytes(tracked):
    checks = leaky_loop.main(epochs=3, steps=10, profiler=tracked)
    first, second, third = checks
    assert first.result.baseline and first.leaks == []
    per_step = leaky_loop.BATCH * leaky_loop.OUT * 4  # one float32 (64, 8) tensor
    for check in (second, third):
        [leak] = check.leaks
        assert leak.grown_bytes == 10 * per_step == 20480
        assert leak.new_count == 10
        frame = user_frame(leak.site.stack)
        assert (os.path.basename(frame[0]), frame[1], frame[2]) == (
            "leaky_loop.py", _leak_line(), "main")
        assert leak.site.allocation_type == "CPU" and leak.site.device == -1
    assert second.index == 2
    assert (second.leaks[0].bytes_before, second.leaks[0].bytes_after) == (20480, 40960)
    assert "leaky_loop.py:%d in main" % _leak_line() in second.report()
    assert "20.00 KiB" in second.report()
    [holder] = second.leaks[0].holders  # kept_errors[10:20] are epoch 2's
    assert holder == "<frame main() local 'kept_errors'>[19] -> Tensor"
    assert (holder.allocation_count, holder.held_bytes) == (10, 20480)
    assert "held by: <frame main() local 'kept_errors'>[19] -> Tensor  (10 allocations, " \
        "20.00 KiB)" in second.report()


def test_raise_on_leak_raises_at_epoch_2_not_at_the_baseline(tracked):
    with pytest.raises(LeakError) as info:
        leaky_loop.main(epochs=3, steps=4, raise_on_leak=True, profiler=tracked)
    assert info.value.result.index == 2
    assert info.value.result.total_grown_bytes == 4 * 2048


def test_tolerance_in_bytes(tracked):
    kept = []
    for _ in range(3):
        with epoch(raise_on_leak=True, tolerance_bytes=4096, profiler=tracked) as e:
            kept.append(torch.zeros(1024))  # 4096 bytes per epoch: within tolerance
    assert e.leaks[0].grown_bytes == 4096
    with pytest.raises(LeakError):
        with epoch(raise_on_leak=True, tolerance_bytes=4095, profiler=tracked):
            kept.append(torch.zeros(1024))


def test_clean_training_loop_reports_nothing_over_20_epochs(tracked):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(8, 16), torch.randn(8, 4)
    results = []
    for _ in range(20):
        with epoch(raise_on_leak=True, profiler=tracked) as e:
            for _ in range(3):
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                opt.step()
        results.append(e.result)
    assert results[0].baseline
    assert [r.leaks for r in results[1:]] == [[]] * 19
    assert len({r.live_bytes for r in results[1:]}) == 1  # the same memory every epoch end
    assert all(r.holder_search is None for r in results)  # nothing grew: no holder search
    assert all("held by" not in r.report() for r in results)


def test_mark_epoch_exact_sites_with_manual_tracking():
    p = torchmem.MemoryProfiler(auto_snapshot=False, capture_stack_traces=True)
    addr = iter(range(0x1000, 0x100000, 0x100))

    def cache_site():
        p.track_allocation(next(addr), 1000, "GPU", 0)

    def other_site():
        p.track_allocation(next(addr), 7, "CPU")

    other_site()
    assert mark_epoch(p).baseline
    for _ in range(2):
        cache_site()
    other_site()
    r = mark_epoch(p, collect=False)
    assert [(g.grown_bytes, g.new_count, g.site.allocation_type, g.site.device,
             user_frame(g.site.stack)[2]) for g in r.leaks] == [
        (2000, 2, "GPU", 0, "test_mark_epoch_exact_sites_with_manual_tracking.<locals>.cache_site"),
        (7, 1, "CPU", -1, "test_mark_epoch_exact_sites_with_manual_tracking.<locals>.other_site"),
    ]
    assert r.total_grown_bytes == 2007
    assert mark_epoch(p).leaks == []  # nothing new: nothing grew
    p.close()


def test_without_stacks_sites_fall_back_to_type_and_device():
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    p.track_allocation(1, 100, "CPU")
    with epoch(profiler=p, stacks=False):
        pass
    with epoch(profiler=p, stacks=False) as e:
        p.track_allocation(2, 50, "CPU")
        p.track_allocation(3, 10, "GPU", 1)
    assert [(g.grown_bytes, g.site.label) for g in e.leaks] == [
        (50, "CPU on host (no stack captured)"), (10, "GPU on device 1 (no stack captured)")]
    assert not p.capture_stack_traces
    p.close()


def test_epoch_turns_stacks_on_and_skips_a_failed_epoch():
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    with pytest.raises(KeyError):
        with epoch(profiler=p) as e:
            raise KeyError("x")
    assert p.capture_stack_traces
    assert e.result is None and e.leaks == [] and e.index == 0
    p.close()
