"""Event chunk BLOBs (``event_chunks.rows``) in their layouts. Standard library only.

The writer child (``_writer.py``, run with ``python -I -S``) stores events as
they arrive, one BLOB per piece of up to 8K events, and expands them into
``events`` rows later; readers decode the chunks not expanded yet. Layouts:

- ``ROWS`` (0): ``n`` EVENT_DTYPE records of 80 bytes (``ROW_FMT``), as the
  Python sinks hand them over.
- ``COLUMNS`` (2; ``COLUMNS_V1`` = 1, schema 4, the same without the
  ``context_id`` column): what the recorder sends natively
  (``Recorder._write_event_columns``):
  ``COLUMNS_HEAD`` (first_seq, n, full_mask, reserved, allocated_before,
  freed_before, min_timestamp_ns, max_timestamp_ns), then each column of
  ``CHUNK_COLUMNS`` in order: ``n`` values, or a single value shared by
  every event when its bit in ``full_mask`` is clear. ``seq`` runs from
  first_seq; the cumulative totals are allocated_before / freed_before plus
  the sizes of the chunk's allocations (kinds 0 and 2) / deallocations
  (kind 1) so far, modulo 2**64. About 8-49 bytes per event instead of 80:
  the training process copies fewer bytes into the pipe and the writer
  fewer into the WAL.

``parse`` checks a BLOB and returns a chunk object the writer reads with
plain ``struct`` calls; ``_event_reads.chunk_events`` decodes the same
objects with numpy. docs/trace-format.md documents the layouts. Every
constant comes from ``torchmem/_trace_format.py`` (generated from
csrc/trace_format.hpp), loaded by path when the package is not importable.
"""

from __future__ import annotations

import functools
import itertools
import operator
import os
import struct
from typing import Iterable, Sequence

if __package__:
    from .. import _trace_format
else:  # the writer child: the package is not importable, its files are
    import importlib.util as _util

    _spec = _util.spec_from_file_location(
        "_trace_format", os.path.join(os.path.dirname(os.path.dirname(
            os.path.abspath(__file__))), "_trace_format.py"))
    _trace_format = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_trace_format)

FORMAT = _trace_format.VALUES


def _sql_code(code: str) -> str:
    return "q" if code == "Q" else code  # 64-bit values go to SQLite bit for bit


_ROW_FIELDS = tuple(tuple(f) for f in FORMAT["row_fields"])
#: Event columns, in EVENT_DTYPE field order (the padding left out): also the
#: column order of the ``events`` table.
EVENT_COLUMNS = tuple(name for name, code in _ROW_FIELDS if code != "x")
#: One EVENT_DTYPE row. Unsigned 64-bit fields unpack as signed ("q"): SQLite
#: integers are signed, so they are stored bit for bit (none is >= 2**63).
ROW_FMT = "".join(_sql_code(code) for _, code in _ROW_FIELDS)
ROW_BYTES = struct.calcsize("<" + ROW_FMT)  # 80
assert ROW_BYTES == FORMAT["row_bytes"]
#: event_chunks.layout
ROWS, COLUMNS_V1, COLUMNS = (FORMAT["layouts"][k] for k in ("rows", "columns_v1", "columns"))
#: Events per event-log chunk (csrc/event_log.hpp), the most a COLUMNS chunk holds.
CHUNK_EVENTS = FORMAT["chunk_events"]
#: Events per time_index row of a ROWS chunk (a COLUMNS chunk is one row).
TIME_CHUNK = 1024

COLUMNS_HEAD = struct.Struct("<" + "".join(code for _, code in FORMAT["columns_header"]))
#: (EVENT_COLUMNS name, struct code of the unsigned or signed value as
#: EVENT_DTYPE holds it), widest first so full columns stay aligned.
CHUNK_COLUMNS = tuple(tuple(c) for c in FORMAT["columns"])
#: The columns of a layout 1 chunk (schema 4): the same without context_id.
CHUNK_COLUMNS_V1 = tuple(c for c in CHUNK_COLUMNS if c[0] != "context_id")
assert len(CHUNK_COLUMNS_V1) == FORMAT["columns_v1_count"]
_ROW_CODES = {name: _sql_code(code) for name, code in _ROW_FIELDS if code != "x"}
_ROW_OFFSETS = {}
_at = 0
for _name, _code in _ROW_FIELDS:
    if _code != "x":
        _ROW_OFFSETS[_name] = _at
    _at += struct.calcsize(_code)
#: kind -> 1 if the event adds its size to total_allocated / total_freed
#: (allocations and reallocations / deallocations); both decoders use these.
ADDS_ALLOCATED = bytes(1 if k in (0, 2) else 0 for k in range(256))
ADDS_FREED = bytes(1 if k == 1 else 0 for k in range(256))


@functools.lru_cache(maxsize=64)
def _strided(rows: int, offset: int, code: str) -> struct.Struct:
    size = struct.calcsize(code)
    return struct.Struct("<" + f"{offset}x{code}{ROW_BYTES - size - offset}x" * rows)


class RowChunk:
    """A ``ROWS`` BLOB: ``n`` records with consecutive seqs (trusted, as the writer stores them)."""

    layout = ROWS

    def __init__(self, data: bytes | bytearray) -> None:
        if not data or len(data) % ROW_BYTES:
            raise ValueError(f"a rows chunk of {len(data)} bytes is not whole 80-byte records")
        self.data = data
        self.n = len(data) // ROW_BYTES
        self.first = struct.unpack_from("<q", data)[0]

    def column(self, name: str, i: int, j: int) -> Sequence[int]:
        """Values of ``name`` (an EVENT_COLUMNS name) for rows ``[i, j)``: one C-level
        unpack that skips the other fields (a strided memoryview costs ~5x more)."""
        return _strided(j - i, _ROW_OFFSETS[name], _ROW_CODES[name]).unpack_from(
            self.data, i * ROW_BYTES)

    def bounds(self, name: str, i: int, j: int) -> tuple[int, int]:
        """(min, max) of ``name`` over rows ``[i, j)``."""
        values = self.column(name, i, j)
        return min(values), max(values)

    def time_bounds(self) -> list[tuple[int, int, int, int]]:
        """time_index rows: (first seq, last seq, min, max timestamp) per TIME_CHUNK rows."""
        out = []
        for i in range(0, self.n, TIME_CHUNK):
            j = min(i + TIME_CHUNK, self.n)
            ts = sorted(self.column("timestamp_ns", i, j))  # one pass where already in order
            out.append((self.first + i, self.first + j - 1, ts[0], ts[-1]))
        return out

    def row_groups(self, group: int) -> tuple[Iterable[Sequence[int]], Sequence[int]]:
        """Flat value tuples of ``group`` rows each (EVENT_COLUMNS per row), and the rest."""
        full = self.n - self.n % group
        groups = struct.Struct("<" + ROW_FMT * group).iter_unpack(
            memoryview(self.data)[:full * ROW_BYTES])
        rest = struct.unpack("<" + ROW_FMT * (self.n - full), self.data[full * ROW_BYTES:])
        return groups, rest


class ColumnChunk:
    """A ``COLUMNS`` (or ``COLUMNS_V1``) BLOB. ``parts``: name -> (byte offset, struct
    code, full); a V1 chunk has no ``context_id`` part (its events read as context 0)."""

    def __init__(self, data: bytes | bytearray, layout: int = COLUMNS) -> None:
        if len(data) < COLUMNS_HEAD.size:
            raise ValueError(f"a columns chunk of {len(data)} bytes is shorter than its header")
        self.layout = layout
        columns = CHUNK_COLUMNS if layout == COLUMNS else CHUNK_COLUMNS_V1
        self.data = data
        (self.first, self.n, mask, reserved, self.allocated_before, self.freed_before,
         self.min_timestamp, self.max_timestamp) = COLUMNS_HEAD.unpack_from(data)
        if not 0 < self.n <= CHUNK_EVENTS or reserved or mask >> len(columns):
            raise ValueError(f"a columns chunk with a bad header (n={self.n}, mask={mask:#x})")
        self.parts: dict[str, tuple[int, str, bool]] = {}
        offset = COLUMNS_HEAD.size
        for bit, (name, code) in enumerate(columns):
            full = bool(mask >> bit & 1)
            self.parts[name] = (offset, code, full)
            offset += struct.calcsize(code) * (self.n if full else 1)
        if offset != len(data):
            raise ValueError(f"a columns chunk of {len(data)} bytes, its header says {offset}")

    def column(self, name: str, i: int, j: int) -> Sequence[int]:
        """Values of ``name`` (a CHUNK_COLUMNS name) for events ``[i, j)``."""
        offset, code, full = self.parts[name]
        code = _sql_code(code)
        if not full:
            value = struct.unpack_from("<" + code, self.data, offset)[0]
            return (value,) * (j - i)
        return struct.unpack_from(f"<{j - i}{code}", self.data,
                                  offset + i * struct.calcsize(code))

    def bounds(self, name: str, i: int, j: int) -> tuple[int, int]:
        """(min, max) of ``name`` over events ``[i, j)``; no pass over a constant column."""
        values = self.column(name, i, j if self.parts[name][2] else i + 1)
        return min(values), max(values)

    def time_bounds(self) -> list[tuple[int, int, int, int]]:
        """The time_index row of the chunk, from its header (readers check it)."""
        return [(self.first, self.first + self.n - 1, self.min_timestamp, self.max_timestamp)]

    def _totals(self, base: int, adds: bytes) -> Sequence[int]:
        # Running sums of size x (0 or 1 by kind), in C: no Python loop per event.
        kinds = self.column("kind", 0, self.n)
        flags = bytes(kinds).translate(adds)
        sizes = self.column("size", 0, self.n)
        sums = list(itertools.accumulate(map(operator.mul, sizes, flags), initial=base))[1:]
        if max(sums) >= 1 << 63 or min(sums) < -(1 << 63):
            # The recorder's totals are uint64 (wrapping); SQLite gets their bits, signed.
            sums = [(v + (1 << 63)) % (1 << 64) - (1 << 63) for v in sums]
        return sums

    def row_groups(self, group: int) -> tuple[Iterable[Sequence[int]], Sequence[int]]:
        """Flat value lists of ``group`` rows each (EVENT_COLUMNS per row), and the rest."""
        n = self.n
        by_name: dict[str, Iterable[int]] = {name: self.column(name, 0, n)
                                             for name in self.parts}
        by_name.setdefault("context_id", [0] * n)  # layout 1: no contexts
        by_name["seq"] = range(self.first, self.first + n)
        by_name["total_allocated"] = self._totals(self.allocated_before, ADDS_ALLOCATED)
        by_name["total_freed"] = self._totals(self.freed_before, ADDS_FREED)
        # Interleaved by extended-slice assignment: a C loop per column.
        k = len(EVENT_COLUMNS)
        flat: list[int] = [0] * (n * k)
        for i, name in enumerate(EVENT_COLUMNS):
            flat[i::k] = by_name[name]
        width = group * len(EVENT_COLUMNS)
        full = (n - n % group) * len(EVENT_COLUMNS)
        return (flat[i:i + width] for i in range(0, full, width)), flat[full:]


def parse(data: bytes | bytearray, layout: int) -> RowChunk | ColumnChunk:
    """The chunk in ``data``; ValueError if it is not a whole chunk of ``layout``."""
    if layout == ROWS:
        return RowChunk(data)
    if layout in (COLUMNS, COLUMNS_V1):
        return ColumnChunk(data, layout)
    raise ValueError(f"unknown event chunk layout {layout!r}")
