// The trace format's constants, defined here once.
//
// The recorder (event_log.hpp, trace_frames.cpp) is built from them, and
// module.cpp exports them as `_native.trace_format()`. The Python side
// cannot always import the native module (the SQLite writer child runs with
// `python -I -S`, standard library only), so src/torchmem/_trace_format.py is
// generated from that export by scripts/gen_trace_format.py and checked in;
// tests/test_trace_format.py fails when the two drift, and torchmem refuses
// to import with a stale copy. docs/trace-format.md describes the same.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchmem {
namespace format {

// Events per event-log chunk: the most a COLUMNS chunk holds.
constexpr uint32_t kChunkEvents = 8192;

// Frames of the SQLite writer's pipe: kind byte, payload length (u64 LE).
constexpr char kFrameHeaderStruct[] = "<cQ";
constexpr size_t kFrameHeaderBytes = 9;
struct FrameKind {
  const char* name;
  char kind;
};
constexpr FrameKind kFrameKinds[] = {
    {"events", 'E'},   // raw EventRow records
    {"columns", 'K'},  // one COLUMNS chunk, written by the recorder
    {"side", 'J'},     // side records as JSON
    {"flush", 'F'},    // a u64 token: commit, then acknowledge
    {"close", 'C'},
};
constexpr char kFrameColumns = 'K';

// event_chunks.layout.
constexpr int kLayoutRows = 0;
constexpr int kLayoutColumnsV1 = 1;  // schema 4: the ten columns without context_id
constexpr int kLayoutColumns = 2;

// A struct-module field: name and code ('x' = one padding byte).
struct Field {
  const char* name;
  const char* code;
  size_t width;
};

// EventRow (event_log.hpp), field by field, little-endian, each with its
// own signedness (SQLite gets unsigned 64-bit values bit for bit, signed).
// Also the column order of the trace's `events` table (padding left out).
constexpr Field kRowFields[] = {
    {"seq", "Q", 8},           {"timestamp_ns", "q", 8},   {"address", "Q", 8},
    {"size", "Q", 8},          {"stream", "Q", 8},         {"step", "Q", 8},
    {"total_allocated", "Q", 8}, {"total_freed", "Q", 8},  {"thread_id", "I", 4},
    {"stack_id", "I", 4},      {"type_id", "H", 2},        {"device", "h", 2},
    {"kind", "B", 1},          {"_pad", "x", 1},           {"context_id", "H", 2},
};
constexpr size_t kRowFieldCount = sizeof(kRowFields) / sizeof(kRowFields[0]);
constexpr size_t kRowBytes = 80;

// The COLUMNS chunk header after the frame header.
constexpr Field kColumnsHeader[] = {
    {"first_seq", "Q", 8},        {"n", "I", 4},
    {"full_mask", "H", 2},        {"reserved", "H", 2},
    {"allocated_before", "Q", 8}, {"freed_before", "Q", 8},
    {"min_timestamp_ns", "q", 8}, {"max_timestamp_ns", "q", 8},
};
constexpr size_t kColumnsHeaderBytes = 48;

// The columns of a COLUMNS chunk, in order (widest first, so full columns
// stay aligned); the struct code is the value's own signedness.
enum Column : int {
  kColTimestamp, kColAddress, kColSize, kColStream, kColStep, kColThread, kColStack,
  kColType, kColDevice, kColContext, kColKind, kColumnCount
};
constexpr Field kColumns[] = {
    {"timestamp_ns", "q", 8}, {"address", "Q", 8},  {"size", "Q", 8},
    {"stream", "Q", 8},       {"step", "I", 4},     {"thread_id", "I", 4},
    {"stack_id", "I", 4},     {"type_id", "H", 2},  {"device", "h", 2},
    {"context_id", "H", 2},   {"kind", "B", 1},
};
static_assert(sizeof(kColumns) / sizeof(kColumns[0]) == kColumnCount, "one spec per column");
// Layout 1's columns: these without context_id, in the same order.
constexpr int kColumnsV1Count = 10;

// Phases of a context (context_table.hpp).
constexpr const char* kPhases[] = {"other", "forward", "backward", "optimizer"};
constexpr int kPhaseCount = 4;

constexpr size_t row_bytes() {
  size_t n = 0;
  for (const Field& f : kRowFields) n += f.width;
  return n;
}
static_assert(row_bytes() == kRowBytes, "kRowFields spans EventRow");
constexpr size_t header_bytes() {
  size_t n = 0;
  for (const Field& f : kColumnsHeader) n += f.width;
  return n;
}
static_assert(header_bytes() == kColumnsHeaderBytes, "kColumnsHeader spans the header");

}  // namespace format
}  // namespace torchmem
