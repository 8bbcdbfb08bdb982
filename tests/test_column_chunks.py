"""COLUMNS chunks: what the recorder writes natively, decoded by the writer and by readers."""

import struct

import numpy as np
import pytest

import torchmem
from torchmem._events import EVENT_DTYPE
from torchmem.storage import SQLiteStorage, TraceReader, _chunks, _writer
from torchmem.storage._event_reads import _columns_chunk

CHUNK = 8192  # events per event-log chunk


def _workload(p: torchmem.MemoryProfiler | None = None) -> torchmem.MemoryProfiler:
    """20,000 events over three event-log chunks, with columns that vary in some
    stretches and not in others: streams, devices, types, sizes, steps."""
    p = p or torchmem.MemoryProfiler(auto_snapshot=False)
    for i in range(10_000):
        if i % 3000 == 2999:
            p.step()
        addr = 0x100000 + (i % 512) * 0x100
        if 100 <= i < 200:  # two streams on a GPU
            p.track_allocation(addr, 256, "GPU", 0, 7 if i % 2 else 9)
        elif 5000 <= i < 5100:
            p.track_allocation(addr, 64 + i, "Pinned", -1, 0)
        else:
            p.track_allocation(addr, 128)
        p.track_deallocation(addr)
    return p


def _rows(p, a, b) -> np.ndarray:
    return np.frombuffer(p._read_events(a, b), EVENT_DTYPE)


def _frames(p, tmp_path, a, b) -> list[bytes]:
    """The payloads of the COLUMNS frames ``_write_event_columns`` writes for [a, b)."""
    path = tmp_path / f"frames{a}-{b}"
    with open(path, "wb") as f:
        sent = p._write_event_columns(f.fileno(), a, b, _writer.COLUMNS)
    assert sent == max(0, min(b, p._next_seq()) - a)
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        kind, n = _writer.HEADER.unpack_from(data, pos)
        assert kind == _writer.COLUMNS
        pos += _writer.HEADER.size
        out.append(data[pos:pos + n])
        pos += n
    assert pos == len(data)
    return out


@pytest.mark.parametrize("a, b", [(0, 20_000), (5, 17), (CHUNK - 2, CHUNK + 3), (10_000, 10_001),
                                  (199, 203), (19_990, 25_000)])
def test_native_frames_decode_to_the_recorders_rows(tmp_path, a, b):
    p = _workload()
    want = _rows(p, a, b)
    payloads = _frames(p, tmp_path, a, b)
    # One frame per event-log chunk the range touches.
    assert len(payloads) == len({s // CHUNK for s in range(a, min(b, 20_000))})
    got = np.concatenate([_columns_chunk(_chunks.ColumnChunk(x)) for x in payloads])
    np.testing.assert_array_equal(got, want)
    for payload in payloads:  # a column goes whole only where it varies
        chunk = _chunks.ColumnChunk(payload)
        rows = _rows(p, chunk.first, chunk.first + chunk.n)
        size = _chunks.COLUMNS_HEAD.size
        for name, code in _chunks.CHUNK_COLUMNS:
            varies = len(np.unique(rows[name])) > 1
            assert chunk.parts[name][2] == varies, name
            size += struct.calcsize(code) * (chunk.n if varies else 1)
        assert len(payload) == size


def test_the_writer_expands_columns_into_the_rows_sqlite_stores(tmp_path):
    # The writer child has no numpy: its struct-based expansion must give
    # the same values, 64-bit fields as signed, group by group.
    p = _workload()
    for payload in _frames(p, tmp_path, 8000, 17_000):
        chunk = _chunks.ColumnChunk(payload)
        want = _rows(p, chunk.first, chunk.first + chunk.n)
        groups, rest = chunk.row_groups(32)
        flat = [v for g in groups for v in g] + list(rest)
        width = len(_chunks.EVENT_COLUMNS)
        assert len(flat) == chunk.n * width
        for k, name in enumerate(_chunks.EVENT_COLUMNS):
            expect = want[name].astype(np.int64) if want[name].dtype.itemsize == 8 else want[name]
            assert flat[k::width] == expect.tolist(), name


def test_sqlite_trace_of_the_workload_is_exact(tmp_path):
    storage = SQLiteStorage(tmp_path / "w.db")
    p = _workload()
    ref = _rows(p, 0, 20_000)
    p.close()
    # The same calls again, now through the pump and the native pipe path.
    q = _workload(torchmem.MemoryProfiler(storage=storage, auto_snapshot=False))
    q.close()
    storage.wait()
    with TraceReader(tmp_path / "w.db") as r:
        assert r.metadata["expanded"] == 1
        got = r.read_events()
    for name in _chunks.EVENT_COLUMNS:
        if name not in ("timestamp_ns", "thread_id"):
            np.testing.assert_array_equal(got[name], ref[name], err_msg=name)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:-1], "header says"),
    (lambda b: b + b"\0", "header says"),
    (lambda b: b[:47], "shorter than its header"),
    (lambda b: b[:14] + b"\1\0" + b[16:], "bad header"),  # reserved
    (lambda b: b[:12] + b"\0\x80" + b[14:], "bad header"),  # a mask bit past the columns
    (lambda b: b[:8] + b"\0\0\0\0" + b[12:], "bad header"),  # n = 0
    (lambda b: b[:8] + struct.pack("<I", CHUNK + 1) + b[12:], "bad header"),
])
def test_damaged_columns_chunks_are_rejected(tmp_path, damage, message):
    p = _workload()
    payload = _frames(p, tmp_path, 10, 20)[0]
    with pytest.raises(ValueError, match=message):
        _chunks.parse(damage(payload), _chunks.COLUMNS)
    with pytest.raises(ValueError, match="unknown event chunk layout"):
        _chunks.parse(payload, 3)
    with pytest.raises(ValueError, match="header"):  # eleven columns read as ten
        _chunks.parse(payload, _chunks.COLUMNS_V1)


def test_schema_4_columns_chunks_decode_with_context_0(tmp_path):
    # Layout 1 (schema 4) had no context_id column: the same chunk without it
    # decodes to the same events, context 0, in both decoders.
    p = torchmem.MemoryProfiler(auto_snapshot=False)
    for i in range(50):
        torchmem._native.set_context(i % 3)
        p.track_allocation(0x1000 + i * 64, 64)
    torchmem._native.set_context(0)
    payload = _frames(p, tmp_path, 0, 50)[0]
    chunk = _chunks.ColumnChunk(payload)
    offset, code, full = chunk.parts["context_id"]
    assert full
    old = bytearray(payload[:offset] + payload[offset + 2 * chunk.n:])
    mask = struct.unpack_from("<H", old, 12)[0]
    struct.pack_into("<H", old, 12, (mask & 0x1FF) | (mask >> 10 & 1) << 9)  # kind: bit 10 -> 9
    v1 = _chunks.parse(bytes(old), _chunks.COLUMNS_V1)
    want = _rows(p, 0, 50).copy()
    assert want["context_id"].tolist() == [i % 3 for i in range(50)]
    want["context_id"] = 0
    np.testing.assert_array_equal(_columns_chunk(v1), want)
    groups, rest = v1.row_groups(32)
    flat = [v for g in groups for v in g] + list(rest)
    k = _chunks.EVENT_COLUMNS.index("context_id")
    assert flat[k::len(_chunks.EVENT_COLUMNS)] == [0] * 50


def test_a_header_whose_times_do_not_match_its_column_is_corrupt(tmp_path):
    p = _workload()
    payload = bytearray(_frames(p, tmp_path, 10, 20)[0])
    chunk = _chunks.ColumnChunk(payload)
    assert chunk.time_bounds() == [(10, 19, *(int(t) for t in (_rows(p, 10, 20)["timestamp_ns"][[0, -1]])))]
    struct.pack_into("<q", payload, 40, chunk.max_timestamp + 1)
    with pytest.raises(ValueError, match="times are not those of its header"):
        _columns_chunk(_chunks.ColumnChunk(payload))


def test_totals_past_2_to_the_63_reach_sqlite_as_their_bits(tmp_path):
    # uint64 totals are stored bit for bit as signed SQLite integers; the
    # writer's expansion must wrap them as the rows path and readers do.
    huge = (1 << 48) - 1
    storage = SQLiteStorage(tmp_path / "big.db")
    p = torchmem.MemoryProfiler(storage=storage, auto_snapshot=False)
    for _ in range(33_000):  # 2**63 bytes allocated after ~32,768 of them
        p.track_allocation(0x1000, huge)
        p.track_deallocation(0x1000)
    want = _rows(p, 0, 66_000)
    assert int(want["total_allocated"][-1]) >= 1 << 63
    for payload in _frames(p, tmp_path, 60_000, 66_000):
        chunk = _chunks.ColumnChunk(payload)
        groups, rest = chunk.row_groups(32)
        flat = [v for g in groups for v in g] + list(rest)
        k = _chunks.EVENT_COLUMNS.index("total_allocated")
        ref = want[chunk.first:chunk.first + chunk.n]["total_allocated"].astype(np.int64)
        assert flat[k::len(_chunks.EVENT_COLUMNS)] == ref.tolist()
    p.close()
    storage.wait()
    with TraceReader(tmp_path / "big.db") as r:
        assert r.metadata["expanded"] == 1
        np.testing.assert_array_equal(r.read_events()["total_allocated"], want["total_allocated"])


@pytest.mark.parametrize("kind, length", [
    (_writer.FLUSH, 3),  # a flush token is 8 bytes
    (_writer.SIDE, 1 << 62),  # would be a MemoryError
    (_writer.COLUMNS, _writer.MAX_COLUMNS_BYTES + 1),
    (b"Z", 4),
], ids=["short-flush", "huge-side", "long-columns", "unknown-kind"])
def test_the_writer_refuses_a_bad_frame_and_reports_it(tmp_path, kind, length):
    import json
    import os
    import threading

    data_r, data_w = os.pipe()
    reply_r, reply_w = os.pipe()
    result = {}
    (tmp_path / "bad.db").touch()  # the writer opens the file its storage made, never creates one
    t = threading.Thread(target=lambda: result.update(w=_writer.serve(
        data_r, reply_w, str(tmp_path / "bad.db"), {})))
    t.start()
    os.write(data_w, _writer.HEADER.pack(kind, length) + b"\0" * 8)
    os.close(data_w)  # EOF: the writer stops draining and returns
    t.join(timeout=30)
    assert not t.is_alive()
    os.close(reply_w)
    with os.fdopen(reply_r) as f:
        replies = [json.loads(line) for line in f]
    os.close(data_r)
    assert replies[0]["ready"] == 1
    assert "bad frame" in replies[1]["error"] and str(length) in replies[1]["error"]
    w = result["w"]
    assert w.error == replies[1]["error"]
    w.close(checkpoint=False)
