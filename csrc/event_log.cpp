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

EventLog::SliceRange EventLog::range_of(const ReadPlan& p, size_t i) {
  const Chunk& c = *p.slices[i].chunk;
  SliceRange r;
  r.lo = std::max(p.start, c.base_seq) - c.base_seq;
  r.hi = std::max(r.lo, std::min<uint64_t>(p.end - c.base_seq, p.slices[i].count));
  r.allocated_before = c.base_allocated;  // the totals are not stored per event
  r.freed_before = c.base_freed;
  for (uint64_t j = 0; j < r.lo; ++j) {
    EventKind kind = static_cast<EventKind>(c.kind[j]);
    r.allocated_before += allocated_delta(kind, c.size[j]);
    r.freed_before += freed_delta(kind, c.size[j]);
  }
  return r;
}

EventRow* EventLog::rows_of(const ReadPlan& p, size_t i, EventRow* out) {
  const Chunk& c = *p.slices[i].chunk;
  SliceRange r = range_of(p, i);
  uint64_t alloc = r.allocated_before, freed = r.freed_before;
  for (uint64_t j = r.lo; j < r.hi; ++j) {
    EventKind kind = static_cast<EventKind>(c.kind[j]);
    alloc += allocated_delta(kind, c.size[j]);
    freed += freed_delta(kind, c.size[j]);
    uint16_t si = c.stream_idx[j];
    *out++ = EventRow{c.base_seq + j, c.timestamp[j], c.address[j], c.size[j],
                      si < p.streams.size() ? p.streams[si] : 0, c.step[j], alloc,
                      freed, c.thread_id[j], c.stack_id[j], c.type_id[j],
                      c.device[j], kind, 0, c.context[j]};
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
  for (size_t i = 0; i < p.slices.size(); ++i) out = rows_of(p, i, out);
}

EventLog::ColumnView EventLog::columns_of(const ReadPlan& p, size_t i) {
  const Chunk& c = *p.slices[i].chunk;
  SliceRange r = range_of(p, i);
  uint64_t lo = r.lo;
  ColumnView v;
  v.first_seq = c.base_seq + lo;
  v.n = static_cast<uint32_t>(r.hi - lo);
  v.allocated_before = r.allocated_before;
  v.freed_before = r.freed_before;
  v.timestamp = c.timestamp + lo;
  v.address = c.address + lo;
  v.size = c.size + lo;
  v.step = c.step + lo;
  v.thread_id = c.thread_id + lo;
  v.stack_id = c.stack_id + lo;
  v.type_id = c.type_id + lo;
  v.stream_idx = c.stream_idx + lo;
  v.device = c.device + lo;
  v.context = c.context + lo;
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
