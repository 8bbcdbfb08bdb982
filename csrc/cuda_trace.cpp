// The CUDA trace tracker's native half (see cuda_trace.hpp): recorder feed
// and the model of torch's segments. Over 400 lines on purpose: the model is
// file-local state, and every entry point that reads or changes it is here, under its lock.
//
// The model knows each live block by its requested size (what torch's
// TraceEntry carries), rounded up to torch's 512-byte granularity, so the
// free ranges it computes include the unused tail of a block torch did not
// split (at most 1 MiB per such block in torch's large pool): "free" here is
// an upper bound of what torch could hand out from its segments, and exact
// for blocks torch split.
#include "cuda_trace.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <map>
#include <mutex>
#include <unordered_set>
#include <utility>
#include <vector>

#include "../src/torchmem/_hook/cuda_hook_api.h"
#include "cuda_plugin.hpp"
#include "cuda_runtime.hpp"
#include "live_map.hpp"
#include "recorder.hpp"
#include "spin_lock.hpp"
#include "stack_capture.hpp"

namespace torchmem {
namespace {

constexpr uint64_t kGranularity = 512;  // torch's kMinBlockSize
inline uint64_t extent(uint64_t size) {
  return size < kGranularity ? kGranularity : (size + kGranularity - 1) / kGranularity * kGranularity;
}

struct Range {
  uint64_t size;
  uint64_t stream;
  int16_t device;
  bool expandable;
};
struct TBlock {
  uint64_t size = 0;
  uint64_t stream = 0;
  int16_t device = 0;
};
struct DeviceTotals {
  uint64_t reserved = 0, allocated = 0, reserved_peak = 0, allocated_peak = 0;
  uint64_t alloc_count = 0, free_count = 0, unknown_frees = 0, oom_count = 0, events = 0;
};
constexpr int kSlots = plugin::kMaxDevices + 1;
inline int dslot(int device) { return (device >= 0 && device < plugin::kMaxDevices) ? device : plugin::kMaxDevices; }

// One lock, held for a few dozen instructions per event (the open-addressing
// block table allocates nothing per block); segment events and queries walk
// the ordered ranges, which are few.
struct Model {
  SpinLock mu;
  std::map<uint64_t, Range> ranges;  // by start address, all devices
  AddressTable<TBlock> blocks;
  DeviceTotals totals[kSlots];
  bool adopting = false;
  std::unordered_set<uint64_t> freed_while_adopting;
  uint64_t last_oom[9] = {};
  int last_oom_count = 0;
};
// Immortal: torch frees blocks during static destruction at exit.
Model& g_model = *new Model;
std::atomic<bool> g_recording{true};
thread_local uint32_t t_stashed_stack = 0;

Recorder* listening() {
  if (!g_recording.load(std::memory_order_relaxed)) return nullptr;
  Recorder* r = gpu_recorder();
  return (r && r->enabled()) ? r : nullptr;
}

void raise(uint64_t& peak, uint64_t now) {
  if (now > peak) peak = now;
}

// Removes [addr, addr + size) from the ranges of the model (an unmap of part
// of an expandable segment, or a segment free). Returns the bytes removed.
uint64_t subtract_locked(Model& m, uint64_t addr, uint64_t size) {
  const uint64_t end = addr + size;
  uint64_t removed = 0;
  auto it = m.ranges.upper_bound(addr);
  if (it != m.ranges.begin()) --it;
  while (it != m.ranges.end() && it->first < end) {
    const uint64_t a = it->first, b = it->first + it->second.size;
    if (b <= addr) {
      ++it;
      continue;
    }
    Range r = it->second;
    it = m.ranges.erase(it);
    const uint64_t lo = std::max(a, addr), hi = std::min(b, end);
    removed += hi - lo;
    if (a < lo) m.ranges.emplace(a, Range{lo - a, r.stream, r.device, r.expandable});
    if (hi < b) it = m.ranges.emplace(hi, Range{b - hi, r.stream, r.device, r.expandable}).first;
  }
  return removed;
}

// The free ranges of one device's (coalesced) segments, with each segment.
struct Span {
  uint64_t address, size, stream, allocated, largest_free;
  uint32_t blocks;
  int16_t device;
  bool expandable;
  std::vector<uint64_t> gaps;
};

// What the span computation needs, copied under the lock so that the
// computation (a sort) runs without it: allocating threads never wait for a
// query.
struct ModelCopy {
  std::vector<std::pair<uint64_t, Range>> ranges;      // by address
  std::vector<std::pair<uint64_t, uint64_t>> blocks;   // (address, requested size)
};
ModelCopy copy_locked(Model& m, int device) {
  ModelCopy c;
  for (const auto& kv : m.ranges)
    if (device < 0 || kv.second.device == device) c.ranges.emplace_back(kv.first, kv.second);
  m.blocks.for_each([&](uint64_t addr, const TBlock& b) {
    if (device < 0 || b.device == device) c.blocks.emplace_back(addr, b.size);
  });
  return c;
}

std::vector<Span> spans_of(ModelCopy c) {
  std::vector<Span> spans;
  for (const auto& kv : c.ranges) {
    const Range& r = kv.second;
    if (!spans.empty()) {
      Span& last = spans.back();
      // Mapped pages of one expandable segment come as adjacent ranges.
      if (last.device == r.device && last.expandable && r.expandable &&
          last.address + last.size == kv.first) {
        last.size += r.size;
        continue;
      }
    }
    spans.push_back(Span{kv.first, r.size, r.stream, 0, 0, 0, r.device, r.expandable, {}});
  }
  std::vector<std::pair<uint64_t, uint64_t>>& live = c.blocks;
  std::sort(live.begin(), live.end());
  size_t bi = 0;
  for (Span& s : spans) {
    const uint64_t end = s.address + s.size;
    while (bi < live.size() && live[bi].first < s.address) ++bi;
    uint64_t cursor = s.address;
    for (; bi < live.size() && live[bi].first < end; ++bi) {
      if (live[bi].first > cursor) s.gaps.push_back(live[bi].first - cursor);
      cursor = std::max(cursor, std::min(end, live[bi].first + extent(live[bi].second)));
      s.allocated += live[bi].second;
      ++s.blocks;
    }
    if (end > cursor) s.gaps.push_back(end - cursor);
    for (uint64_t g : s.gaps) s.largest_free = std::max(s.largest_free, g);
  }
  return spans;
}

std::vector<Span> spans_now(Model& m, int device) {
  ModelCopy c;
  {
    std::lock_guard<SpinLock> lock(m.mu);
    c = copy_locked(m, device);
  }
  return spans_of(std::move(c));
}

uint64_t fragmented(const std::vector<Span>& spans, uint64_t request) {
  uint64_t bytes = 0;
  for (const Span& s : spans)
    for (uint64_t g : s.gaps)
      if (g < request) bytes += g;
  return bytes;
}

uint64_t largest_free(const std::vector<Span>& spans) {
  uint64_t largest = 0;
  for (const Span& s : spans) largest = std::max(largest, s.largest_free);
  return largest;
}

void add_block_locked(Model& m, uint64_t addr, uint64_t size, uint64_t stream, int device) {
  m.blocks.put(addr, TBlock{size, stream, static_cast<int16_t>(device)});
  DeviceTotals& t = m.totals[dslot(device)];
  t.allocated += size;
  ++t.alloc_count;
  raise(t.allocated_peak, t.allocated);
}

void add_range_locked(Model& m, uint64_t addr, uint64_t size, uint64_t stream, int device,
                      bool expandable) {
  // A range seen twice (adopted, then reported) is counted once.
  uint64_t removed = subtract_locked(m, addr, size);
  m.ranges[addr] = Range{size, stream, static_cast<int16_t>(device), expandable};
  DeviceTotals& t = m.totals[dslot(device)];
  t.reserved = t.reserved - std::min(t.reserved, removed) + size;
  raise(t.reserved_peak, t.reserved);
}

void remove_range_locked(Model& m, uint64_t addr, uint64_t size, int device) {
  uint64_t removed = subtract_locked(m, addr, size);
  DeviceTotals& t = m.totals[dslot(device)];
  t.reserved -= std::min(t.reserved, removed);
}

void on_oom(int device, uint64_t requested, uint64_t device_free, uint64_t stream) {
  uint64_t total = 0, allocated = 0, reserved = 0;
  int count = 0;
  ModelCopy copy;
  {
    std::lock_guard<SpinLock> lock(g_model.mu);
    DeviceTotals& t = g_model.totals[dslot(device)];
    ++t.oom_count;
    allocated = t.allocated;
    reserved = t.reserved;
    count = ++g_model.last_oom_count;
    copy = copy_locked(g_model, device);
  }
  const std::vector<Span> spans = spans_of(std::move(copy));
  {
    std::lock_guard<SpinLock> lock(g_model.mu);
    uint64_t* o = g_model.last_oom;
    o[0] = static_cast<uint64_t>(device);
    o[1] = requested;
    o[2] = device_free;
    o[3] = reserved;
    o[4] = allocated;
    o[5] = largest_free(spans);
    o[6] = fragmented(spans, requested);
    o[7] = static_cast<uint64_t>(count);
    uint64_t free_bytes = 0;
    for (const Span& sp : spans)
      for (uint64_t g : sp.gaps) free_bytes += g;
    o[8] = free_bytes;
  }
  // The device's size: the trace entry only carries its free bytes.
  if (const cuda::Runtime* rt = cuda::runtime()) {
    cuda::DeviceGuard guard(rt, device);
    size_t f = 0, tt = 0;
    cuda::Error err = rt->MemGetInfo(&f, &tt);
    if (err == cuda::kSuccess) total = tt;
    cuda::clear_own_error(rt, err);
  }
  if (Recorder* r = listening()) {
    OomInfo info{};
    info.requested = requested;
    info.device = static_cast<int16_t>(device);
    info.stream = stream;
    info.device_free = device_free;
    info.device_total = total;
    info.live_bytes = allocated;
    info.stack_id = t_stashed_stack;
    r->record_oom(info, kTypeGPU);
  }
  t_stashed_stack = 0;
}

}  // namespace

void stash_stack_for_trace() {
  Recorder* r = listening();
  t_stashed_stack = (r && stack_capture_enabled()) ? capture_stack_in_allocator() : 0;
}

}  // namespace torchmem

using namespace torchmem;

extern "C" {

void torchmem_cuda_trace_event(int action, int device, uint64_t address, uint64_t size,
                               uint64_t stream) {
  Model& m = g_model;
  switch (action) {
    case TORCHMEM_TRACE_ALLOC: {
      const uint32_t stack = t_stashed_stack;
      t_stashed_stack = 0;
      {
        std::lock_guard<SpinLock> lock(m.mu);
        ++m.totals[dslot(device)].events;
        TBlock old;
        if (m.blocks.erase(address, &old)) {  // a free this tracker never saw
          DeviceTotals& t = m.totals[dslot(old.device)];
          t.allocated -= std::min(t.allocated, old.size);
        }
        add_block_locked(m, address, size, stream, device);
      }
      if (Recorder* r = listening()) {
        r->record_alloc(address, size, kTypeGPU, static_cast<int16_t>(device), stream, stack);
      }
      return;
    }
    case TORCHMEM_TRACE_FREE_COMPLETED: {
      bool known;
      {
        std::lock_guard<SpinLock> lock(m.mu);
        DeviceTotals& t = m.totals[dslot(device)];
        ++t.events;
        TBlock gone;
        known = m.blocks.erase(address, &gone);
        if (known) {
          DeviceTotals& owner = m.totals[dslot(gone.device)];
          owner.allocated -= std::min(owner.allocated, gone.size);
          ++owner.free_count;
        } else {
          // A block from before the tracker started that was not adopted.
          ++t.unknown_frees;
          if (m.adopting) m.freed_while_adopting.insert(address);
        }
      }
      if (!known) return;
      if (Recorder* r = listening()) r->record_free(address, static_cast<int64_t>(size));
      return;
    }
    case TORCHMEM_TRACE_SEGMENT_ALLOC:
    case TORCHMEM_TRACE_SEGMENT_MAP: {
      std::lock_guard<SpinLock> lock(m.mu);
      ++m.totals[dslot(device)].events;
      add_range_locked(m, address, size, stream, device, action == TORCHMEM_TRACE_SEGMENT_MAP);
      return;
    }
    case TORCHMEM_TRACE_SEGMENT_FREE:
    case TORCHMEM_TRACE_SEGMENT_UNMAP: {
      std::lock_guard<SpinLock> lock(m.mu);
      ++m.totals[dslot(device)].events;
      remove_range_locked(m, address, size, device);
      return;
    }
    case TORCHMEM_TRACE_OOM:
      on_oom(device, size, address, stream);
      return;
    default: {  // FREE_REQUESTED, SNAPSHOT: nothing changes yet
      std::lock_guard<SpinLock> lock(m.mu);
      ++m.totals[dslot(device)].events;
      return;
    }
  }
}

void torchmem_cuda_trace_set_recording(int on) { g_recording.store(on != 0); }

void torchmem_cuda_trace_set_adopting(int on) {
  std::lock_guard<SpinLock> lock(g_model.mu);
  g_model.adopting = on != 0;
  if (!on) g_model.freed_while_adopting.clear();
}

int torchmem_cuda_trace_adopt_block(int device, uint64_t address, uint64_t size,
                                    uint64_t stream) {
  {
    std::lock_guard<SpinLock> lock(g_model.mu);
    if (g_model.blocks.find(address) || g_model.freed_while_adopting.count(address)) return 0;
    add_block_locked(g_model, address, size, stream, device);
  }
  if (Recorder* r = listening()) {
    r->record_alloc(address, size, kTypeGPU, static_cast<int16_t>(device), stream, 0);
  }
  return 1;
}

int torchmem_cuda_trace_adopt_segment(int device, uint64_t address, uint64_t size,
                                      uint64_t stream, int expandable) {
  std::lock_guard<SpinLock> lock(g_model.mu);
  auto it = g_model.ranges.find(address);
  if (it != g_model.ranges.end() && it->second.size == size) return 0;
  add_range_locked(g_model, address, size, stream, device, expandable != 0);
  return 1;
}

size_t torchmem_cuda_trace_replay_live(void) {
  Recorder* r = listening();
  if (!r) return 0;
  std::vector<std::pair<uint64_t, TBlock>> live;
  {
    std::lock_guard<SpinLock> lock(g_model.mu);
    g_model.blocks.for_each([&](uint64_t addr, const TBlock& b) { live.emplace_back(addr, b); });
  }
  std::sort(live.begin(), live.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  size_t fed = 0;
  LiveEntry known{};
  for (const auto& kv : live) {
    if (r->lookup_live(kv.first, &known)) continue;  // a profiler that saw it already
    r->record_alloc(kv.first, kv.second.size, kTypeGPU, kv.second.device, kv.second.stream, 0);
    ++fed;
  }
  return fed;
}

void torchmem_cuda_trace_reset(void) {
  std::lock_guard<SpinLock> lock(g_model.mu);
  g_model.ranges.clear();
  g_model.blocks = AddressTable<TBlock>();
  for (DeviceTotals& t : g_model.totals) t = DeviceTotals{};
  g_model.adopting = false;
  g_model.freed_while_adopting.clear();
  std::memset(g_model.last_oom, 0, sizeof g_model.last_oom);
  g_model.last_oom_count = 0;
}

int torchmem_cuda_trace_stats(int device, uint64_t* out, int len) {
  DeviceTotals sum;
  ModelCopy copy;
  {
    std::lock_guard<SpinLock> lock(g_model.mu);
    for (int d = 0; d < kSlots; ++d) {
      if (device >= 0 && d != dslot(device)) continue;
      const DeviceTotals& t = g_model.totals[d];
      sum.reserved += t.reserved;
      sum.allocated += t.allocated;
      sum.reserved_peak += t.reserved_peak;
      sum.allocated_peak += t.allocated_peak;
      sum.alloc_count += t.alloc_count;
      sum.free_count += t.free_count;
      sum.unknown_frees += t.unknown_frees;
      sum.oom_count += t.oom_count;
      sum.events += t.events;
    }
    copy = copy_locked(g_model, device);
  }
  const uint64_t blocks = copy.blocks.size();
  const std::vector<Span> spans = spans_of(std::move(copy));
  uint64_t free_bytes = 0;
  for (const Span& s : spans)
    for (uint64_t g : s.gaps) free_bytes += g;
  const uint64_t values[TORCHMEM_TRACE_STAT_COUNT] = {
      sum.reserved, sum.allocated, sum.reserved_peak, sum.allocated_peak,
      static_cast<uint64_t>(spans.size()), blocks, largest_free(spans), free_bytes,
      sum.alloc_count, sum.free_count, sum.unknown_frees, sum.oom_count, sum.events};
  int n = std::min(len, TORCHMEM_TRACE_STAT_COUNT);
  for (int i = 0; i < n; ++i) out[i] = values[i];
  return n;
}

void torchmem_cuda_trace_reset_peak(int device) {
  std::lock_guard<SpinLock> lock(g_model.mu);
  for (int d = 0; d < kSlots; ++d) {
    if (device >= 0 && d != dslot(device)) continue;
    DeviceTotals& t = g_model.totals[d];
    t.reserved_peak = t.reserved;
    t.allocated_peak = t.allocated;
  }
}

uint64_t torchmem_cuda_trace_fragmentation(int device, uint64_t request) {
  return fragmented(spans_now(g_model, device), request);
}

size_t torchmem_cuda_trace_segments(int device, TorchmemTraceSegment* out, size_t capacity) {
  std::vector<Span> spans = spans_now(g_model, device);
  std::stable_sort(spans.begin(), spans.end(),
                   [](const Span& a, const Span& b) { return a.device < b.device; });
  for (size_t i = 0; out && i < spans.size() && i < capacity; ++i) {
    const Span& s = spans[i];
    out[i] = TorchmemTraceSegment{s.address, s.size, s.stream, s.allocated, s.largest_free,
                                  s.blocks, s.device, s.expandable ? 1u : 0u, 0u};
  }
  return spans.size();
}

int torchmem_cuda_trace_last_oom(uint64_t* out, int len) {
  std::lock_guard<SpinLock> lock(g_model.mu);
  if (g_model.last_oom_count == 0) return 0;
  int n = std::min(len, 9);
  for (int i = 0; i < n; ++i) out[i] = g_model.last_oom[i];
  return n;
}

}  // extern "C"
