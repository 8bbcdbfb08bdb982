"""Stack capture names the caller's file, line and function."""

import inspect

import torchmem


def allocate_here(p, address):
    line = inspect.currentframe().f_lineno + 1
    p.track_allocation(address, 128)
    return line


def test_stack_names_caller(profiler):
    p = profiler
    p.capture_stack_traces = True
    line = allocate_here(p, 0x100)
    (leak,) = p.detect_potential_leaks()
    frames = leak.stack_trace.frames
    assert frames[0] == (__file__, line, "allocate_here")
    assert frames[1][0] == __file__ and frames[1][2] == "test_stack_names_caller"
    assert 'line %d, in allocate_here' % line in leak.stack_trace.format()
    (event,) = p.get_events()
    assert event.stack_trace == leak.stack_trace


def test_stacks_off_by_default(profiler):
    assert profiler.capture_stack_traces is False
    profiler.track_allocation(1, 1)
    assert profiler.get_events()[0].stack_trace is None


def recurse(p, depth, address):
    if depth == 0:
        p.track_allocation(address, 1)
        return
    recurse(p, depth - 1, address)


def test_max_depth_limits_frames(profiler):
    p = profiler
    p.capture_stack_traces = True
    p.max_stack_trace_depth = 3
    recurse(p, 20, 1)
    frames = p.detect_potential_leaks()[0].stack_trace.frames
    assert len(frames) == 3
    assert all(f[2] == "recurse" for f in frames)


def test_same_site_interned_once(profiler):
    p = profiler
    p.capture_stack_traces = True
    for i in range(10):
        allocate_here(p, i + 1)
    ids = {int(r["stack_id"]) for r in p.live_allocations()}
    assert len(ids) == 1


def test_torchmem_frames_are_skipped(profiler):
    # A call made from inside the package reports the user's frame instead.
    from torchmem import _native
    p = profiler
    p.capture_stack_traces = True
    stack_id = _native.capture_stack(5)
    frames = torchmem.profiler.MemoryProfiler.resolve_stack(p, stack_id).frames
    assert frames[0][2] == "test_torchmem_frames_are_skipped"
