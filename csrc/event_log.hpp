// The event log: fixed-size columnar chunks in a bounded ring.
//
// 45 bytes per retained event. The cumulative allocated / freed totals that
// every event reports are not stored: each chunk keeps the totals at its
// first event and read() adds the sizes up, so they cost nothing per event.
#pragma once

#include <cstddef>
#include <cstdint>
#include <deque>
#include <memory>
#include <vector>

#include "trace_format.hpp"

namespace torchmem {

enum class EventKind : uint8_t {
  Allocation = 0,
  Deallocation = 1,
  Reallocation = 2,
  Snapshot = 3,
  GcStart = 4,
  GcEnd = 5,
  OutOfMemory = 6,
};

// One event as read back (full width; streams and totals expanded). The
// layout is also the binary row Python reads with numpy (EVENT_DTYPE in
// src/torchmem/_events.py, from format::kRowFields): widest fields first,
// so there is no padding but the explicit byte after `kind`. context_id
// sits where schema 4 had two more padding bytes, which were always 0: an
// old row reads as context 0 (none).
struct EventRow {
  uint64_t seq;
  int64_t timestamp_ns;
  uint64_t address;
  uint64_t size;
  uint64_t stream;
  uint64_t step;
  uint64_t total_allocated;  // cumulative bytes allocated after this event
  uint64_t total_freed;      // cumulative bytes freed after this event
  uint32_t thread_id;
  uint32_t stack_id;
  uint16_t type_id;
  int16_t device;
  EventKind kind;
  uint8_t pad;
  uint16_t context_id;  // context_table.hpp; 0 = none
};
static_assert(sizeof(EventRow) == format::kRowBytes, "EventRow is a file and numpy layout");
static_assert(offsetof(EventRow, kind) == 76 && offsetof(EventRow, context_id) == 78,
              "EventRow matches format::kRowFields");

// What an event adds to the cumulative totals.
inline uint64_t allocated_delta(EventKind k, uint64_t size) {
  return (k == EventKind::Allocation || k == EventKind::Reallocation) ? size : 0;
}
inline uint64_t freed_delta(EventKind k, uint64_t size) {
  return k == EventKind::Deallocation ? size : 0;
}

class EventLog {
 public:
  static constexpr uint32_t kChunkEvents = format::kChunkEvents;

  explicit EventLog(uint64_t retention_events);

  // Appends; `stream_idx` indexes the recorder's stream table. Not locked:
  // the recorder serialises calls.
  // Inline: it runs for every event, and a call with thirteen arguments
  // costs as much as the stores themselves.
  uint64_t append(int64_t ts, EventKind kind, uint64_t address, uint64_t size,
                  int16_t device, uint16_t stream_idx, uint16_t type_id,
                  uint64_t step, uint32_t tid, uint32_t stack_id, uint16_t context,
                  uint64_t total_allocated_before, uint64_t total_freed_before) {
    if (tail_ == nullptr || tail_->count == kChunkEvents)
      open_chunk(total_allocated_before, total_freed_before);
    Chunk& c = *tail_;
    uint32_t i = c.count;
    c.timestamp[i] = ts;
    c.address[i] = address;
    c.size[i] = size;
    c.step[i] = step > UINT32_MAX ? UINT32_MAX : static_cast<uint32_t>(step);
    c.thread_id[i] = tid;
    c.stack_id[i] = stack_id;
    c.type_id[i] = type_id;
    c.stream_idx[i] = stream_idx;
    c.device[i] = device;
    c.context[i] = context;
    c.kind[i] = static_cast<uint8_t>(kind);
    c.count = i + 1;
    return next_seq_++;
  }

  uint64_t next_seq() const { return next_seq_; }
  uint64_t first_seq() const;
  uint64_t retention() const { return retention_; }
  void set_consumer_seq(uint64_t seq) { consumer_seq_ = seq; }

  // Reading the rows of [start, end) that are still retained, in order,
  // without holding the recorder's lock while rows are built (a
  // sink copying 64K events would otherwise stall every writer): under the
  // lock, plan() pins the range, so no chunk in it is evicted or reused,
  // and notes each chunk with its event count at that moment (a chunk is
  // only ever appended to past that count). fill() then needs no lock;
  // finish() (under the lock) drops the pin.
  struct Slice;
  struct ReadPlan {
    uint64_t start = 0;
    uint64_t end = 0;
    uint64_t rows = 0;
    std::vector<Slice> slices;
    std::vector<uint64_t> streams;
    bool pinned = false;
  };
  ReadPlan plan(uint64_t start, uint64_t end, const std::vector<uint64_t>& streams) const;
  static void fill(const ReadPlan& plan, EventRow* out);  // out: plan.rows rows
  // The events of slice `i` of a plan as the chunk's own columns, for a
  // sink that sends them as they are (csrc/trace_frames.cpp): no row is
  // built. The pointers stay valid until finish(plan).
  struct ColumnView {
    uint64_t first_seq = 0;
    uint32_t n = 0;
    uint64_t allocated_before = 0;  // cumulative totals before first_seq
    uint64_t freed_before = 0;
    const int64_t* timestamp = nullptr;
    const uint64_t* address = nullptr;
    const uint64_t* size = nullptr;
    const uint32_t* step = nullptr;
    const uint32_t* thread_id = nullptr;
    const uint32_t* stack_id = nullptr;
    const uint16_t* type_id = nullptr;
    const uint16_t* stream_idx = nullptr;  // into plan.streams
    const int16_t* device = nullptr;
    const uint16_t* context = nullptr;
    const uint8_t* kind = nullptr;
  };
  static ColumnView columns_of(const ReadPlan& plan, size_t i);
  void finish(ReadPlan& plan) const;
  // First seq whose step >= lo, and first seq whose step > hi.
  uint64_t lower_bound_step(uint64_t step) const;
  uint64_t lower_bound_time(int64_t ts) const;
  size_t memory_bytes() const;

 private:
  struct Chunk {
    uint64_t base_seq;
    uint64_t base_allocated;  // cumulative totals before the chunk's first event
    uint64_t base_freed;
    uint32_t count = 0;
    int64_t timestamp[kChunkEvents];
    uint64_t address[kChunkEvents];
    uint64_t size[kChunkEvents];
    uint32_t step[kChunkEvents];
    uint32_t thread_id[kChunkEvents];
    uint32_t stack_id[kChunkEvents];
    uint16_t type_id[kChunkEvents];
    uint16_t stream_idx[kChunkEvents];
    int16_t device[kChunkEvents];
    uint16_t context[kChunkEvents];
    uint8_t kind[kChunkEvents];
  };
  void open_chunk(uint64_t total_allocated_before, uint64_t total_freed_before);
  // Slice `i` of a plan within its chunk: events [lo, hi) of the chunk, and
  // the cumulative totals before lo. Shared by rows and columns.
  struct SliceRange {
    uint64_t lo = 0, hi = 0;
    uint64_t allocated_before = 0, freed_before = 0;
  };
  static SliceRange range_of(const ReadPlan& plan, size_t i);
  // The rows of slice `i` into out; returns the end of what it wrote.
  static EventRow* rows_of(const ReadPlan& plan, size_t i, EventRow* out);
  void evict_if_needed();
  template <typename Key>
  uint64_t lower_bound(Key key_of, uint64_t value) const;

  uint64_t retention_;
  uint64_t next_seq_ = 0;
  uint64_t consumer_seq_ = UINT64_MAX;
  mutable std::vector<uint64_t> pins_;  // starts of plans in progress
  std::deque<std::unique_ptr<Chunk>> chunks_;
  std::unique_ptr<Chunk> spare_;  // reused instead of freed and reallocated
  Chunk* tail_ = nullptr;         // chunks_.back(), the one being filled

 public:
  struct Slice {
    const Chunk* chunk;
    uint32_t count;  // events of the chunk when planned
  };
};

}  // namespace torchmem
