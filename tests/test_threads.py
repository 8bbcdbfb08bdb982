"""Counters stay exact under concurrent tracking."""

import threading

from torchmem import MemoryProfiler


def test_eight_threads_100k_pairs_each():
    p = MemoryProfiler(auto_snapshot=False, retention_events=1 << 16)
    n_threads, pairs = 8, 100_000
    barrier = threading.Barrier(n_threads)

    def work(t):
        base = (t + 1) << 32
        barrier.wait()
        for i in range(pairs):
            p.track_allocation(base + (i % 1000) * 64, 64 + t)
            p.track_deallocation(base + (i % 1000) * 64)
        p.track_allocation(base, 1000 + t)  # one survivor per thread

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = p.get_statistics()
    per_thread = sum(pairs * (64 + t) for t in range(n_threads))
    survivors = sum(1000 + t for t in range(n_threads))
    assert s.allocation_count == n_threads * (pairs + 1)
    assert s.deallocation_count == n_threads * pairs
    assert s.total_allocated_bytes == per_thread + survivors
    assert s.total_freed_bytes == per_thread
    assert s.current_usage_bytes == survivors
    assert p.anomalies["total"] == 0
    assert len(p.detect_potential_leaks()) == n_threads
    assert len(set(p.live_allocations()["thread_id"].tolist())) == n_threads
    p.close()
