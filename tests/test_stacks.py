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


def _chain(p, depth, address, line_choice):
    """``depth`` frames of this function, then one allocation from line A or B."""
    if depth > 0:
        return _chain(p, depth - 1, address, line_choice)
    here = inspect.currentframe().f_lineno
    if line_choice == "A":
        p.track_allocation(address, 1)  # here + 2
        return here + 2
    p.track_allocation(address, 1)  # here + 4
    return here + 4


def _lines(p, address):
    row = [r for r in p.live_allocations() if int(r["address"]) == address][0]
    return [(f[1], f[2]) for f in p.resolve_stack(int(row["stack_id"])).frames]


def test_stacks_that_share_outer_frames_resolve_exactly(profiler):
    """Each thread reuses the nodes of its last stack for the outer frames a new
    stack shares with it: the inner frames differ, the stack is the deeper or
    the shallower of the two, or the same again; every one resolves exactly."""
    p = profiler
    p.capture_stack_traces = True
    p.max_stack_trace_depth = 8
    calls = [(3, "A"), (3, "B"), (3, "A"), (1, "A"), (5, "B"), (1, "A"), (3, "A")]
    lines = {}
    for i, (depth, choice) in enumerate(calls):
        lines[i], call_line = _chain(p, depth, 0x1000 + i, choice), inspect.currentframe().f_lineno
    chain_line = _chain.__code__.co_firstlineno + 3
    for i, (depth, choice) in enumerate(calls):
        want = [(lines[i], "_chain")] + [(chain_line, "_chain")] * depth + [
            (call_line, "test_stacks_that_share_outer_frames_resolve_exactly")]
        got = _lines(p, 0x1000 + i)
        assert got[:len(want)] == want, (i, depth, choice)
        assert len(got) == min(8, len(want) + len(inspect.stack()) - 1)
    ids = [int(r["stack_id"]) for r in p.live_allocations()]
    assert ids[0] == ids[2] == ids[6] and ids[3] == ids[5]  # the same stack, the same id
    assert len({ids[0], ids[1], ids[3], ids[4]}) == 4


def test_threads_keep_their_own_last_stack(profiler):
    """Two threads alternating between two stacks: each gets its own stacks back."""
    import threading

    p = profiler
    p.capture_stack_traces = True
    results = {}
    barrier = threading.Barrier(2)

    def work(name, depth, choice, base_address):
        out = []
        for i in range(50):
            barrier.wait()
            out.append(_chain(p, depth, base_address + i, choice))
        results[name] = out

    threads = [threading.Thread(target=work, args=("x", 2, "A", 0x10000)),
               threading.Thread(target=work, args=("y", 4, "B", 0x20000))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name, depth, base_address in (("x", 2, 0x10000), ("y", 4, 0x20000)):
        for i in (0, 25, 49):
            got = _lines(p, base_address + i)
            assert got[0] == (results[name][i], "_chain")
            assert [f for f in got if f[1] == "_chain"][1:] == [
                (_chain.__code__.co_firstlineno + 3, "_chain")] * depth
            assert got[depth + 1][1] == "test_threads_keep_their_own_last_stack.<locals>.work"
