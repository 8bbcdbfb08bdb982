"""MemoryProfiler against a plain-Python reference model (hypothesis, stateful).

Random sequences of allocate / free / reallocate / step / snapshot / enable /
disable, with repeated, unknown and bad addresses and sizes, several
allocation types and devices, drive a real profiler and a reference model
written from the recorder's documented semantics (csrc/recorder.cpp):

- an allocation over a live address closes the old one first (a DEALLOCATION
  event of the old size) and counts ``alloc_over_live``;
- a free of an address that is not live counts ``double_free`` when the
  address is still in the recorder's recently-freed filter (a direct-mapped
  table of 16K slots keyed by the address hash, which the model mirrors
  slot for slot) and ``unknown_free`` otherwise;
- a free with a size that differs from the recorded one counts
  ``size_mismatch`` and frees the recorded size;
- a reallocation frees the old address (DEALLOCATION, or an unknown/double
  free anomaly when it is not live), closes a live allocation at the new
  address (``alloc_over_live``), then logs REALLOCATION of the new address
  with the old allocation's type, device and stream (CPU, -1, 0 when the old
  one was not live);
- while disabled, track_* calls are ignored entirely (even bad arguments);
  snapshots and steps still happen.

After every step the counters (overall, per type, per device, per type and
device), the live set, the whole event log (kinds, addresses, sizes, types,
devices, streams, steps, cumulative totals, threads, seq numbers) and the
anomaly counts and examples must agree exactly.

Set TORCHMEM_MODEL_EXAMPLES to run more examples (default keeps this file
well under a minute).
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from torchmem import MemoryEventType, MemoryProfiler

MASK64 = 2**64 - 1
FILTER_SLOTS = 1 << 14  # AddressSet::kSlots in csrc/live_map.hpp
TYPE_NONE = 0xFFFF
ANOMALY_KINDS = ("unknown_free", "double_free", "size_mismatch", "alloc_over_live",
                 "bad_argument")
EXAMPLES_PER_KIND = 8
ALLOC, FREE, REALLOC, SNAPSHOT = 0, 1, 2, 3


def mix(a: int) -> int:
    """hash_address() of csrc/live_map.hpp."""
    a ^= a >> 33
    a = (a * 0xFF51AFD7ED558CCD) & MASK64
    a ^= a >> 33
    return a


def filter_slot(a: int) -> int:
    return mix(a) & (FILTER_SLOTS - 1)


def _colliding_pair() -> tuple[int, int]:
    """Two small addresses that share a slot of the recently-freed filter."""
    seen: dict[int, int] = {}
    a = 4096
    while True:
        s = filter_slot(a)
        if s in seen:
            return seen[s], a
        seen[s] = a
        a += 16


COLLIDE_A, COLLIDE_B = _colliding_pair()
ADDRESSES = st.one_of(
    st.sampled_from([0, 16, 32, 48, 64, 4096, COLLIDE_A, COLLIDE_B, 2**63 - 1, 2**48 + 16]),
    st.integers(min_value=0, max_value=512).map(lambda i: i * 16),
)
# Up to the largest size the API takes (2**48 - 1 bytes); see
# test_sizes_are_bounded_so_counters_cannot_wrap.
SIZES = st.one_of(st.sampled_from([0, 1, 7, 64, 4096, 2**40, 2**48 - 1]),
                  st.integers(min_value=0, max_value=10**6))
TYPES = st.sampled_from(["CPU", "GPU", "Pinned", "arena", "caché-λ", "t" * 64])
DEVICES = st.sampled_from([-1, 0, 1, 7, 32767])
STREAMS = st.sampled_from([0, 0, 1, 7, 2**63 - 1])

# (call, exception) pairs: each must raise and record nothing while enabled.
BAD_CALLS = [
    (lambda p: p.track_allocation(-16, 10), ValueError),
    (lambda p: p.track_allocation(16, -1), ValueError),
    (lambda p: p.track_allocation(16, 2**63), ValueError),
    (lambda p: p.track_allocation(2**64, 1), ValueError),
    (lambda p: p.track_allocation(16.0, 1), TypeError),
    (lambda p: p.track_allocation(16, 1.0), TypeError),
    (lambda p: p.track_allocation(16, True), TypeError),
    (lambda p: p.track_allocation(16, 1, None), TypeError),
    (lambda p: p.track_allocation(16, 1, b"CPU"), TypeError),
    (lambda p: p.track_allocation(16, 1, ""), ValueError),
    (lambda p: p.track_allocation(16, 1, "x" * 65), ValueError),
    (lambda p: p.track_allocation(16, 1, "CPU", -2), ValueError),
    (lambda p: p.track_allocation(16, 1, "CPU", 32768), ValueError),
    (lambda p: p.track_allocation(16, 1, "never-used", 2**40), ValueError),
    (lambda p: p.track_allocation(16, 1, "CPU", -1, -1), ValueError),
    (lambda p: p.track_allocation(16, 1, "CPU", -1, 2**63), ValueError),
    (lambda p: p.track_deallocation(-16), ValueError),
    (lambda p: p.track_deallocation(16, -1), ValueError),
    (lambda p: p.track_deallocation(16, 1.5), TypeError),
    (lambda p: p.track_deallocation(None), TypeError),
    (lambda p: p.track_reallocation(16, 32, -1), ValueError),
    (lambda p: p.track_reallocation(-16, 32, 1), ValueError),
    (lambda p: p.track_reallocation(16, "32", 1), TypeError),
    (lambda p: p.track_reallocation(16, 32), TypeError),
]


class Counters:
    __slots__ = ("allocated", "freed", "current", "peak", "n_alloc", "n_free")

    def __init__(self) -> None:
        self.allocated = self.freed = self.current = self.peak = 0
        self.n_alloc = self.n_free = 0

    def add(self, size: int) -> None:
        self.allocated += size
        self.current += size
        self.n_alloc += 1
        self.peak = max(self.peak, self.current)

    def remove(self, size: int) -> None:
        self.freed += size
        self.current -= size
        self.n_free += 1

    def as_tuple(self) -> tuple[int, ...]:
        return (self.allocated, self.freed, self.current, self.peak, self.n_alloc, self.n_free)


class Model:
    """The reference: plain dicts and lists, no cleverness."""

    def __init__(self) -> None:
        self.enabled = True
        self.step = 0
        self.live: dict[int, dict] = {}
        self.recent: dict[int, int] = {}  # filter slot -> address
        self.total = Counters()
        self.by_type: dict[str, Counters] = {}
        self.by_device: dict[int, Counters] = {}
        self.by_pair: dict[tuple[str, int], Counters] = {}
        self.events: list[tuple] = []  # (kind, address, size, type, device, stream, step, alloc, freed)
        self.anomalies = dict.fromkeys(ANOMALY_KINDS, 0)
        self.examples: list[dict] = []
        self.snapshots = 0

    # -- pieces -------------------------------------------------------------
    def _slices(self, type_name: str, device: int) -> list[Counters]:
        return [self.total,
                self.by_type.setdefault(type_name, Counters()),
                self.by_device.setdefault(device, Counters()),
                self.by_pair.setdefault((type_name, device), Counters())]

    def _log(self, kind: int, address: int, size: int, type_name: str | None, device: int,
             stream: int) -> int:
        self.events.append((kind, address, size, type_name, device, stream, self.step,
                            self.total.allocated, self.total.freed))
        return len(self.events) - 1

    def _anomaly(self, kind: str, address: int, size: int, expected: int) -> None:
        self.anomalies[kind] += 1
        same = [i for i, e in enumerate(self.examples) if e["kind"] == kind]
        if len(same) >= EXAMPLES_PER_KIND:
            del self.examples[same[0]]
        self.examples.append({"kind": kind, "address": address, "size_bytes": size,
                              "expected_size_bytes": expected, "seq": len(self.events)})

    def _add(self, address: int, size: int, type_name: str, device: int, stream: int,
             kind: int) -> None:
        seq = self._log(kind, address, size, type_name, device, stream)
        for c in self._slices(type_name, device):
            c.add(size)
        self.live[address] = {"size": size, "type": type_name, "device": device,
                              "stream": stream, "seq": seq, "step": self.step}
        if self.recent.get(filter_slot(address)) == address:
            del self.recent[filter_slot(address)]

    def _free(self, address: int, size: int | None) -> dict | None:
        """Frees `address` if live (logging DEALLOCATION); else counts the anomaly."""
        entry = self.live.get(address)
        if entry is None:
            twice = self.recent.get(filter_slot(address)) == address
            self._anomaly("double_free" if twice else "unknown_free", address,
                          0 if size is None else size, 0)
            return None
        if size is not None and size != entry["size"]:
            self._anomaly("size_mismatch", address, size, entry["size"])
        del self.live[address]
        self._log(FREE, address, entry["size"], entry["type"], entry["device"],
                  entry["stream"])
        for c in self._slices(entry["type"], entry["device"]):
            c.remove(entry["size"])
        self.recent[filter_slot(address)] = address
        return entry

    # -- operations ---------------------------------------------------------
    def allocate(self, address, size, type_name, device, stream) -> None:
        if not self.enabled:
            return
        old = self.live.get(address)
        if old is not None:
            self._anomaly("alloc_over_live", address, size, old["size"])
            self._free(address, None)
        self._add(address, size, type_name, device, stream, ALLOC)

    def free(self, address, size) -> None:
        if self.enabled:
            self._free(address, size)

    def reallocate(self, old_address, new_address, size) -> None:
        if not self.enabled:
            return
        old = self._free(old_address, None)
        type_name, device, stream = ("CPU", -1, 0) if old is None else (
            old["type"], old["device"], old["stream"])
        clash = self.live.get(new_address)
        if clash is not None:
            self._anomaly("alloc_over_live", new_address, size, clash["size"])
            self._free(new_address, None)
        self._add(new_address, size, type_name, device, stream, REALLOC)

    def rows(self) -> list[tuple]:
        """The events with the cumulative totals *after* each (as the recorder reports)."""
        out = []
        for kind, a, s, t, d, stream, step, alloc, freed in self.events:
            if kind in (ALLOC, REALLOC):
                alloc += s
            elif kind == FREE:
                freed += s
            out.append((kind, a, s, t, d, stream, step, alloc, freed))
        return out

    def snapshot(self) -> None:
        self._log(SNAPSHOT, self.snapshots, self.total.current, None, -1, 0)
        self.snapshots += 1


class ProfilerMachine(RuleBasedStateMachine):
    @initialize(retention=st.sampled_from([1 << 20, 1]))
    def start(self, retention):
        # retention=1 still keeps a whole chunk (8192 events): nothing is
        # evicted at these sizes, which the event checks prove.
        self.p = MemoryProfiler(auto_snapshot=False, retention_events=retention)
        self.m = Model()
        self.tid = threading.get_native_id()

    def teardown(self):
        p = getattr(self, "p", None)
        if p is not None:
            p.close()

    # -- rules ----------------------------------------------------------------
    @rule(address=ADDRESSES, size=SIZES, type_name=TYPES, device=DEVICES, stream=STREAMS,
          keywords=st.booleans())
    def allocate(self, address, size, type_name, device, stream, keywords):
        if keywords:
            self.p.track_allocation(address=address, size_bytes=size,
                                    allocation_type=type_name, device=device, stream=stream)
        elif type_name == "CPU" and device == -1 and stream == 0:
            self.p.track_allocation(address, size)
        else:
            self.p.track_allocation(address, size, type_name, device, stream)
        self.m.allocate(address, size, type_name, device, stream)

    @rule(address=ADDRESSES, size=st.one_of(st.none(), SIZES))
    def free_any(self, address, size):
        self.p.track_deallocation(address, size)
        self.m.free(address, size)

    @precondition(lambda self: self.m.live)
    @rule(data=st.data(), how=st.sampled_from(["none", "exact", "wrong", "keyword"]))
    def free_live(self, data, how):
        address = data.draw(st.sampled_from(sorted(self.m.live)))
        size = self.m.live[address]["size"]
        if how == "none":
            self.p.track_deallocation(address)
            self.m.free(address, None)
        elif how == "exact":
            self.p.track_deallocation(address, size)
            self.m.free(address, size)
        elif how == "wrong":
            wrong = size - 1 if size else 1  # stays within the largest size taken
            self.p.track_deallocation(address, wrong)
            self.m.free(address, wrong)
        else:
            self.p.track_deallocation(address=address, size_bytes=size)
            self.m.free(address, size)

    @rule(old=ADDRESSES, new=ADDRESSES, size=SIZES)
    def reallocate_any(self, old, new, size):
        self.p.track_reallocation(old, new, size)
        self.m.reallocate(old, new, size)

    @precondition(lambda self: self.m.live)
    @rule(data=st.data(), new=ADDRESSES, size=SIZES, same=st.booleans())
    def reallocate_live(self, data, new, size, same):
        old = data.draw(st.sampled_from(sorted(self.m.live)))
        new = old if same else new
        self.p.track_reallocation(old_address=old, new_address=new, new_size_bytes=size)
        self.m.reallocate(old, new, size)

    @rule()
    def step(self):
        assert self.p.step() == self.m.step + 1
        self.m.step += 1

    @rule()
    def snapshot(self):
        snap = self.p.track_snapshot()
        assert snap.current_usage_bytes == self.m.total.current
        assert snap.peak_usage_bytes == self.m.total.peak
        assert snap.step == self.m.step
        self.m.snapshot()

    @rule()
    def disable(self):
        self.p.disable()
        self.m.enabled = False

    @rule()
    def enable(self):
        self.p.enable()
        self.m.enabled = True

    @rule(which=st.integers(min_value=0, max_value=len(BAD_CALLS) - 1))
    def bad_call(self, which):
        call, exc = BAD_CALLS[which]
        if self.m.enabled:
            with pytest.raises(exc):
                call(self.p)
        else:
            call(self.p)  # ignored without a look at the arguments

    @rule(lo=st.integers(0, 6), span=st.integers(-1, 6), open_end=st.booleans())
    def query_steps(self, lo, span, open_end):
        hi = None if open_end else lo + span
        if hi is not None and hi < 0:
            with pytest.raises(ValueError, match="end_step"):
                self.p.get_events(lo, hi)
            return
        got = self.p.get_events(lo, hi)
        want = [(i, e) for i, e in enumerate(self.m.rows())
                if e[6] >= lo and (hi is None or e[6] <= hi)]
        assert len(got) == len(want)
        snaps = self.p.snapshots
        for ev, (_i, (kind, address, size, type_name, device, stream, step, alloc, freed)) in \
                zip(got, want):
            assert ev.event_type == MemoryEventType(kind)
            assert ev.size_bytes == size and ev.step == step
            assert (ev.device, ev.stream) == (device, stream)
            assert (ev.total_allocated_bytes, ev.total_freed_bytes) == (alloc, freed)
            assert ev.thread_id == self.tid and ev.stack_trace is None
            if kind == SNAPSHOT:
                assert ev.address == 0 and ev.allocation_type == ""
                assert ev.details["snapshot"] is snaps[address]
                assert ev.current_usage_bytes == size
            else:
                assert ev.address == address and ev.allocation_type == type_name
                assert ev.details is None

    @rule(data=st.data())
    def allocations_since(self, data):
        rows = self.p.get_event_rows()
        if not len(rows):
            return
        k = data.draw(st.integers(0, len(rows) - 1))
        ts = int(rows["timestamp_ns"][k])
        got = self.p.get_allocations_since(ts / 1e9)
        # Float seconds: every event whose own float timestamp is at least the
        # float just below t (so the event at ts is always in).
        lowest = math.nextafter(ts / 1e9, -math.inf)
        want = [i for i, r in enumerate(rows.tolist())
                if r[1] / 1e9 >= lowest and self.m.events[i][0] in (ALLOC, REALLOC)]
        assert [(e.address, e.size_bytes, e.timestamp_ns) for e in got] == \
            [(self.m.events[i][1], self.m.events[i][2], int(rows["timestamp_ns"][i]))
             for i in want]
        exact = self.p.get_allocations_since(since_ns=ts)
        assert [e.timestamp_ns for e in exact] == [
            r[1] for i, r in enumerate(rows.tolist())
            if r[1] >= ts and self.m.events[i][0] in (ALLOC, REALLOC)]

    @rule(min_age_steps=st.integers(0, 4))
    def leaks(self, min_age_steps):
        got = self.p.detect_potential_leaks(min_age_steps=min_age_steps)
        want = sorted(((e["size"], e["seq"], a) for a, e in self.m.live.items()
                       if e["step"] <= self.m.step - min_age_steps),
                      key=lambda t: (-t[0], t[1]))
        assert [(leak.address, leak.size_bytes) for leak in got] == [(a, s) for s, _, a in want]
        assert all(leak.stack_trace is None for leak in got)

    # -- invariants -------------------------------------------------------------
    @invariant()
    def counters_agree(self):
        p, m = self.p, self.m
        s = p.get_statistics()
        assert (s.total_allocated_bytes, s.total_freed_bytes, s.current_usage_bytes,
                s.peak_usage_bytes, s.allocation_count, s.deallocation_count) == \
            m.total.as_tuple()
        assert s.average_allocation_size_bytes == (
            m.total.allocated / m.total.n_alloc if m.total.n_alloc else 0.0)
        assert s.usage_by_type == {t: c.current for t, c in m.by_type.items() if c.n_alloc}
        assert s.usage_by_device == {d: c.current for d, c in m.by_device.items() if c.n_alloc}
        assert p.is_enabled == m.enabled and p.current_step == m.step
        for t, c in m.by_type.items():
            st_t = p.get_statistics_for_type(t)
            assert (st_t.total_allocated_bytes, st_t.total_freed_bytes,
                    st_t.current_usage_bytes, st_t.peak_usage_bytes, st_t.allocation_count,
                    st_t.deallocation_count) == c.as_tuple()
            assert st_t.usage_by_device == {
                d: pc.current for (tt, d), pc in m.by_pair.items() if tt == t and pc.current}
        for d, c in m.by_device.items():
            st_d = p.get_statistics_for_device(d)
            assert (st_d.total_allocated_bytes, st_d.total_freed_bytes,
                    st_d.current_usage_bytes, st_d.peak_usage_bytes, st_d.allocation_count,
                    st_d.deallocation_count) == c.as_tuple()
        for (t, d), c in m.by_pair.items():
            type_id = p._type_names().index(t)
            assert tuple(p._counters(type_id, d)) == c.as_tuple()
        assert p.get_statistics_for_type("never-used").allocation_count == 0

    @invariant()
    def live_set_agrees(self):
        live = self.p.live_allocations()
        names = self.p._type_names()
        got = [(int(r["address"]), int(r["size"]), names[int(r["type_id"])], int(r["device"]),
                int(r["stream"]), int(r["seq"]), int(r["step"]), int(r["thread_id"]),
                int(r["stack_id"])) for r in live]
        want = sorted(((a, e["size"], e["type"], e["device"], e["stream"], e["seq"], e["step"],
                        self.tid, 0) for a, e in self.m.live.items()), key=lambda t: t[5])
        assert got == want
        assert self.p._live_count() == len(self.m.live)

    @invariant()
    def events_agree(self):
        rows = self.p.get_event_rows()
        m = self.m
        assert len(rows) == len(m.events)
        if not len(rows):
            return
        names = self.p._type_names()
        assert rows["seq"].tolist() == list(range(len(rows)))
        ts = rows["timestamp_ns"]
        assert bool(np.all(ts[1:] >= ts[:-1]))
        assert set(rows["thread_id"].tolist()) == {self.tid}
        assert not rows["stack_id"].any()
        got = [(k, a, s, None if t == TYPE_NONE else names[t], d, stream, step, alloc, freed)
               for k, a, s, t, d, stream, step, alloc, freed in zip(
                   rows["kind"].tolist(), rows["address"].tolist(), rows["size"].tolist(),
                   rows["type_id"].tolist(), rows["device"].tolist(), rows["stream"].tolist(),
                   rows["step"].tolist(), rows["total_allocated"].tolist(),
                   rows["total_freed"].tolist())]
        assert got == m.rows()

    @invariant()
    def anomalies_agree(self):
        a = self.p.anomalies
        assert a["counts"] == self.m.anomalies
        assert a["total"] == sum(self.m.anomalies.values())
        got = [{k: e[k] for k in ("kind", "address", "size_bytes", "expected_size_bytes", "seq")}
               for e in a["examples"]]
        assert got == self.m.examples
        assert all(e["thread_id"] == self.tid for e in a["examples"])


_EXAMPLES = int(os.environ.get("TORCHMEM_MODEL_EXAMPLES", "120"))
ProfilerMachine.TestCase.settings = settings(
    max_examples=_EXAMPLES,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestProfilerModel = ProfilerMachine.TestCase


def test_filter_mirror_is_exact():
    """The model's recently-freed filter matches the recorder's on a collision."""
    p = MemoryProfiler(auto_snapshot=False)
    a, b = COLLIDE_A, COLLIDE_B
    assert filter_slot(a) == filter_slot(b)
    p.track_allocation(a, 1)
    p.track_allocation(b, 1)
    p.track_deallocation(a)
    p.track_deallocation(b)  # b evicts a from the shared slot
    p.track_deallocation(b)  # double free: b is remembered
    p.track_deallocation(a)  # a was evicted: counted as unknown, not double
    assert p.anomalies["counts"]["double_free"] == 1
    assert p.anomalies["counts"]["unknown_free"] == 1
    p.close()


def test_sizes_are_bounded_so_counters_cannot_wrap():
    """Sizes are limited to below 2**48 bytes (256 TiB, more than any device):
    no number of live allocations a process can hold wraps a 64-bit counter."""
    p = MemoryProfiler(auto_snapshot=False)
    big = 2**48 - 1
    for address in (1, 2, 3):
        p.track_allocation(address, big)
    s = p.get_statistics()
    assert s.current_usage_bytes == 3 * big == s.peak_usage_bytes == s.total_allocated_bytes
    with pytest.raises(ValueError, match="size_bytes"):
        p.track_allocation(4, 2**48)
    with pytest.raises(ValueError, match="new_size_bytes"):
        p.track_reallocation(1, 5, 2**48)
    p.close()
