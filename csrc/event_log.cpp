#include "event_log.hpp"

#include <algorithm>

namespace torchmem {

EventLog::EventLog(uint64_t retention_events)
    : retention_(std::max<uint64_t>(retention_events, kChunkEvents)) {}

uint64_t EventLog::first_seq() const {
  return chunks_.empty() ? next_seq_ : chunks_.front()->base_seq;
}

void EventLog::open_chunk(uint64_t total_allocated_before, uint64_t total_freed_before) {
  evict_if_needed();
  // `new Chunk` (not make_unique) leaves the columns uninitialised: zeroing
  // 350 KB per chunk would cost more than filling it.
  std::unique_ptr<Chunk> c = spare_ ? std::move(spare_) : std::unique_ptr<Chunk>(new Chunk);
  c->base_seq = next_seq_;
  c->base_allocated = total_allocated_before;
  c->base_freed = total_freed_before;
  c->count = 0;
  tail_ = c.get();
  chunks_.push_back(std::move(c));
}

void EventLog::evict_if_needed() {
  // Called before a new chunk is opened: keep at most `retention_` full
  // events behind it, but never drop what a consumer has not read yet.
  while (!chunks_.empty()) {
    const Chunk& front = *chunks_.front();
    uint64_t retained_after = next_seq_ - (front.base_seq + front.count);
    if (retained_after < retention_) break;
    if (front.base_seq + front.count > consumer_seq_) break;
    bool pinned = false;
    for (uint64_t pin : pins_) pinned |= front.base_seq + front.count > pin;
    if (pinned) break;
    spare_ = std::move(chunks_.front());
    chunks_.pop_front();
  }
}

EventRow* EventLog::rows_of(const Chunk& c, uint32_t count, uint64_t start, uint64_t end,
                           const std::vector<uint64_t>& streams, EventRow* out) {
  uint64_t alloc = c.base_allocated, freed = c.base_freed;
  for (uint32_t i = 0; i < count; ++i) {
    uint64_t seq = c.base_seq + i;
    if (seq >= end) break;
    EventKind kind = static_cast<EventKind>(c.kind[i]);
    alloc += allocated_delta(kind, c.size[i]);
    freed += freed_delta(kind, c.size[i]);
    if (seq < start) continue;
    uint16_t si = c.stream_idx[i];
    *out++ = EventRow{seq, c.timestamp[i], c.address[i], c.size[i],
                      si < streams.size() ? streams[si] : 0, c.step[i], alloc,
                      freed, c.thread_id[i], c.stack_id[i], c.type_id[i],
                      c.device[i], kind, {0, 0, 0}};
  }
  return out;
}

EventLog::ReadPlan EventLog::plan(uint64_t start, uint64_t end,
                                  const std::vector<uint64_t>& streams) const {
  ReadPlan p;
  p.start = std::max(start, first_seq());
  p.end = std::min(end, next_seq_);
  if (p.start >= p.end) return p;
  p.rows = p.end - p.start;
  size_t ci = (p.start - chunks_.front()->base_seq) / kChunkEvents;
  for (; ci < chunks_.size() && chunks_[ci]->base_seq < p.end; ++ci)
    p.slices.push_back(Slice{chunks_[ci].get(), chunks_[ci]->count});
  p.streams = streams;
  pins_.push_back(p.start);
  p.pinned = true;
  return p;
}

void EventLog::fill(const ReadPlan& p, EventRow* out) {
  for (const Slice& s : p.slices) out = rows_of(*s.chunk, s.count, p.start, p.end, p.streams, out);
}

EventLog::ColumnView EventLog::columns_of(const ReadPlan& p, size_t i) {
  const Chunk& c = *p.slices[i].chunk;
  uint64_t lo = std::max(p.start, c.base_seq) - c.base_seq;
  uint64_t hi = std::min<uint64_t>(p.end - c.base_seq, p.slices[i].count);
  ColumnView v;
  v.first_seq = c.base_seq + lo;
  v.n = hi > lo ? static_cast<uint32_t>(hi - lo) : 0;
  v.allocated_before = c.base_allocated;
  v.freed_before = c.base_freed;
  for (uint64_t j = 0; j < lo; ++j) {  // the totals are not stored per event
    EventKind kind = static_cast<EventKind>(c.kind[j]);
    v.allocated_before += allocated_delta(kind, c.size[j]);
    v.freed_before += freed_delta(kind, c.size[j]);
  }
  v.timestamp = c.timestamp + lo;
  v.address = c.address + lo;
  v.size = c.size + lo;
  v.step = c.step + lo;
  v.thread_id = c.thread_id + lo;
  v.stack_id = c.stack_id + lo;
  v.type_id = c.type_id + lo;
  v.stream_idx = c.stream_idx + lo;
  v.device = c.device + lo;
  v.kind = c.kind + lo;
  return v;
}

void EventLog::finish(ReadPlan& p) const {
  if (!p.pinned) return;
  auto it = std::find(pins_.begin(), pins_.end(), p.start);
  if (it != pins_.end()) pins_.erase(it);
  p.pinned = false;
}

template <typename Key>
uint64_t EventLog::lower_bound(Key key_of, uint64_t value) const {
  // Steps and timestamps never decrease along the log, so both searches are
  // a binary search over chunks, then within one.
  if (chunks_.empty()) return next_seq_;
  size_t lo = 0, hi = chunks_.size();
  while (lo < hi) {  // first chunk whose last event's key >= value
    size_t mid = (lo + hi) / 2;
    const Chunk& c = *chunks_[mid];
    if (static_cast<uint64_t>(key_of(c, c.count - 1)) < value) lo = mid + 1;
    else hi = mid;
  }
  if (lo == chunks_.size()) return next_seq_;
  const Chunk& c = *chunks_[lo];
  uint32_t a = 0, b = c.count;
  while (a < b) {
    uint32_t mid = (a + b) / 2;
    if (static_cast<uint64_t>(key_of(c, mid)) < value) a = mid + 1;
    else b = mid;
  }
  return c.base_seq + a;
}

uint64_t EventLog::lower_bound_step(uint64_t step) const {
  return lower_bound([](const Chunk& c, uint32_t i) { return c.step[i]; }, step);
}

uint64_t EventLog::lower_bound_time(int64_t ts) const {
  if (ts < 0) return first_seq();
  return lower_bound([](const Chunk& c, uint32_t i) { return c.timestamp[i]; },
                     static_cast<uint64_t>(ts));
}

size_t EventLog::memory_bytes() const {
  return (chunks_.size() + (spare_ ? 1 : 0)) * sizeof(Chunk);
}

}  // namespace torchmem
