// The CUDA plugin's counters and controls: what torch.cuda.memory_stats and
// friends report under the plugin (torch reads them through the compiled
// allocator class's getDeviceStats, or through torchmem.cuda's Python patch
// when only the C functions are installed), the memory-fraction limit,
// cacheInfo, the live-block list snapshot() is built from, peer access, and
// the table of entry points handed to the run-time-built library.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <vector>

#include "../src/torchmem/_hook/cuda_hook_api.h"
#include "cuda_plugin.hpp"
#include "cuda_plugin_state.hpp"
#include "cuda_runtime.hpp"
#include "cuda_trace.hpp"

namespace torchmem {
namespace plugin {

ShardTotals sum_totals(int device_slot) {
  ShardTotals t;
  for (int i = 0; i < kShards; ++i) {
    Shard& s = g_shards[i];
    std::lock_guard<SpinLock> lock(s.mu);
    for (int d = 0; d <= kMaxDevices; ++d) {
      if (device_slot >= 0 && d != device_slot) continue;
      t.allocated += s.totals[d].allocated;
      t.freed += s.totals[d].freed;
      t.alloc_count += s.totals[d].alloc_count;
      t.free_count += s.totals[d].free_count;
    }
  }
  return t;
}

uint64_t total_live_blocks() {
  ShardTotals t = sum_totals(-1);
  return t.alloc_count - t.free_count;
}

namespace {

size_t copy_text(const std::string& text, char* buf, size_t len) {
  if (buf && len) {
    size_t n = std::min(len - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return text.size();
}

DeviceCounters counters_of(int device) {
  DeviceCounters d;
  uint64_t base_oom = 0, base_retry = 0;
  auto add = [&](const DeviceState& c) {
    d.current += c.current.load(std::memory_order_relaxed);
    d.peak += c.peak.load(std::memory_order_relaxed);  // summed over devices: an upper bound
    d.peak_live_blocks += c.peak_blocks.load(std::memory_order_relaxed);
    d.oom_count += c.oom_count.load(std::memory_order_relaxed);
    d.retry_count += c.retry_count.load(std::memory_order_relaxed);
    d.limit += c.cap.load(std::memory_order_relaxed);
    base_oom += c.base_oom_count.load(std::memory_order_relaxed);
    base_retry += c.base_retry_count.load(std::memory_order_relaxed);
  };
  uint64_t base_allocated = 0, base_freed = 0, base_allocs = 0, base_frees = 0;
  auto add_base = [&](const DeviceState& c) {
    base_allocated += c.base_allocated.load(std::memory_order_relaxed);
    base_freed += c.base_freed.load(std::memory_order_relaxed);
    base_allocs += c.base_alloc_count.load(std::memory_order_relaxed);
    base_frees += c.base_free_count.load(std::memory_order_relaxed);
  };
  if (device < 0) {
    for (const DeviceState& c : g_devices) {
      add(c);
      add_base(c);
    }
  } else {
    add(state_for(device));
    add_base(state_for(device));
  }
  ShardTotals t = sum_totals(device < 0 ? -1 : slot(device));
  d.live_blocks = t.alloc_count - t.free_count;
  d.allocated = t.allocated - base_allocated;
  d.freed = t.freed - base_freed;
  d.alloc_count = t.alloc_count - base_allocs;
  d.free_count = t.free_count - base_frees;
  d.oom_count -= base_oom;
  d.retry_count -= base_retry;
  d.unknown_frees = g_unknown_frees.load(std::memory_order_relaxed);
  d.deferred_frees = g_deferred.load(std::memory_order_relaxed);
  d.unfenced_blocks = g_unfenced.load(std::memory_order_relaxed);
  d.reserved = d.current;
  d.reserved_peak = d.peak;
  Backend* b = g_backend.load(std::memory_order_acquire);
  uint64_t rc = 0, rh = 0;
  if (b && device >= 0 && b->reserved(device, &rc, &rh)) {
    d.reserved = rc;
    d.reserved_peak = rh;
  }
  return d;
}

void reset_accumulated_of(int device) {
  ShardTotals t = sum_totals(slot(device));
  DeviceState& c = state_for(device);
  c.base_allocated.store(t.allocated);
  c.base_freed.store(t.freed);
  c.base_alloc_count.store(t.alloc_count);
  c.base_free_count.store(t.free_count);
  c.base_oom_count.store(c.oom_count.load());
  c.base_retry_count.store(c.retry_count.load());
}

}  // namespace
}  // namespace plugin
}  // namespace torchmem

using namespace torchmem;
using namespace torchmem::plugin;

extern "C" {

void torchmem_reset(void) {
  Backend* b = g_backend.load(std::memory_order_acquire);
  if (!b) return;
  for (int d = 0; d < kMaxDevices; ++d) {
    if (g_devices[d].used.load(std::memory_order_relaxed)) b->release_cache(d);
  }
}

void torchmem_set_memory_fraction(double fraction, int device) {
  Backend* b = backend();
  DeviceState& c = state_for(device);
  uint64_t free_b = 0, total_b = 0;
  if (!b || fraction >= 1.0 || fraction < 0.0 || !b->mem_info(device, &free_b, &total_b)) {
    c.cap.store(0);
    c.fraction.store(1.0);
    return;
  }
  uint64_t cap = static_cast<uint64_t>(fraction * static_cast<double>(total_b));
  c.cap.store(cap ? cap : 1);  // fraction 0 allows nothing, as in torch
  c.fraction.store(fraction);
}

double torchmem_cuda_memory_fraction(int device) {
  return state_for(device).fraction.load(std::memory_order_relaxed);
}

void* torchmem_base_alloc(void* ptr, size_t* size) {
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  Shard& s = shard_for(addr);
  std::lock_guard<SpinLock> lock(s.mu);
  const Block* blk = s.table.find(addr);
  // Every block is its own segment; a pointer the plugin does not know has
  // no block, which torch must not read as a leftover value.
  if (size) *size = blk ? blk->size : 0;
  return ptr;
}

uint64_t torchmem_cuda_largest_free_block(int device) {
  Backend* b = backend();
  if (!b) return 0;
  uint64_t largest = 0;
  if (!b->largest_free(device, &largest)) largest = 0;
  DeviceState& c = state_for(device);
  uint64_t cap = c.cap.load(std::memory_order_relaxed);
  if (cap) {
    uint64_t used = c.current.load(std::memory_order_relaxed);
    largest = std::min<uint64_t>(largest, used >= cap ? 0 : cap - used);
  }
  return largest;
}

int torchmem_cuda_enable_peer_access(int device, int peer) {
  Backend* b = backend();
  std::string err;
  if (!b) {
    set_last_message("torchmem CUDA plugin: no CUDA runtime: " + g_backend_error);
    return -1;
  }
  if (b->enable_peer_access(device, peer, &err)) return 0;
  set_last_message("torchmem CUDA plugin: peer access from device " + std::to_string(device) +
                   " to device " + std::to_string(peer) + " failed: " + err);
  return -1;
}

int torchmem_cuda_mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) {
  Backend* b = backend();
  uint64_t f = 0, t = 0;
  if (!b || !b->mem_info(device, &f, &t)) return -1;
  if (free_bytes) *free_bytes = f;
  if (total_bytes) *total_bytes = t;
  return 0;
}

size_t torchmem_cuda_live_blocks(void* out, size_t capacity) {
  std::vector<TorchmemBlock> all;
  for (int i = 0; i < kShards; ++i) {
    Shard& s = g_shards[i];
    std::lock_guard<SpinLock> lock(s.mu);
    s.table.for_each([&](uint64_t addr, const Block& blk) {
      TorchmemBlock b{};
      b.address = addr;
      b.size = blk.size;
      b.stream = blk.stream;
      b.device = blk.device;
      b.flags = (blk.captured ? TORCHMEM_ALLOC_CAPTURED : 0u) | (blk.deferred ? 2u : 0u);
      all.push_back(b);
    });
  }
  std::sort(all.begin(), all.end(),
            [](const TorchmemBlock& a, const TorchmemBlock& b) { return a.address < b.address; });
  if (out) {
    size_t n = std::min(capacity, all.size());
    std::memcpy(out, all.data(), n * sizeof(TorchmemBlock));
  }
  return all.size();
}

int torchmem_plugin_set_backend(const char* name) {
  if (!name) return -1;
  std::string why;
  std::string n(name);
  if (n != "async" && n != "sync" && n != "host" && n != "fake") return -1;
  Backend* b = backend_by_name(n, &why);
  if (!b) {
    std::lock_guard<std::mutex> lock(g_backend_mu);
    g_backend_error = why;
    return -3;
  }
  std::lock_guard<std::mutex> lock(g_backend_mu);
  Backend* cur = g_backend.load();
  if (cur == b) return 0;
  if (cur && total_live_blocks() != 0) return -2;
  g_backend.store(b, std::memory_order_release);
  return 0;
}

const char* torchmem_plugin_backend(void) {
  Backend* b = g_backend.load(std::memory_order_acquire);
  return b ? b->name() : "";
}

size_t torchmem_plugin_last_oom_message(char* buf, size_t len) {
  std::lock_guard<std::mutex> lock(g_oom_mu);
  return copy_text(g_last_oom, buf, len);
}

int torchmem_plugin_stats(int device, uint64_t* out, int len) {
  DeviceCounters d = counters_of(device);
  const uint64_t values[kStatCount] = {
      d.current,    d.peak,       d.allocated,     d.freed,          d.alloc_count,
      d.free_count, d.oom_count,  d.retry_count,   d.reserved,       d.reserved_peak,
      d.live_blocks, d.unknown_frees, d.peak_live_blocks, d.deferred_frees,
      d.unfenced_blocks, d.limit};
  int n = std::min<int>(len, kStatCount);
  for (int i = 0; i < n; ++i) out[i] = values[i];
  return n;
}

void torchmem_plugin_reset_peak(int device) {
  auto reset = [](DeviceState& c) {
    c.peak.store(c.current.load(std::memory_order_relaxed), std::memory_order_relaxed);
    c.peak_blocks.store(c.blocks.load(std::memory_order_relaxed), std::memory_order_relaxed);
  };
  Backend* b = g_backend.load(std::memory_order_acquire);
  if (device < 0) {
    for (int d = 0; d <= kMaxDevices; ++d) {
      reset(g_devices[d]);
      if (b && d < kMaxDevices && g_devices[d].used.load()) b->reset_reserved_peak(d);
    }
  } else {
    reset(state_for(device));
    if (b) b->reset_reserved_peak(device);
  }
}

void torchmem_plugin_reset_accumulated(int device) {
  if (device < 0) {
    for (int d = 0; d <= kMaxDevices; ++d) reset_accumulated_of(d);
  } else {
    reset_accumulated_of(device);
  }
}

uint64_t torchmem_plugin_live_blocks(void) { return total_live_blocks(); }

size_t torchmem_cuda_runtime_description(char* buf, size_t len) {
  std::string text = cuda::runtime_description();
  {
    std::lock_guard<std::mutex> lock(g_backend_mu);
    if (!g_backend_error.empty()) text += "; last backend error: " + g_backend_error;
  }
  return copy_text(text, buf, len);
}

}  // extern "C"

namespace {
void api_init(int device_count) { torchmem_init(device_count); }
void api_empty_cache() { torchmem_reset(); }
int api_stats(int device, uint64_t* out, int len) { return torchmem_plugin_stats(device, out, len); }
size_t api_live_blocks(TorchmemBlock* out, size_t capacity) {
  return torchmem_cuda_live_blocks(out, capacity);
}
const char* api_backend_name() { return backend() ? backend()->name() : ""; }
void api_stash_stack() { torchmem::stash_stack_for_trace(); }

const TorchmemCudaHookApi kApi = {
    TORCHMEM_CUDA_HOOK_API_VERSION,
    sizeof(TorchmemCudaHookApi),
    &torchmem_cuda_alloc,
    &torchmem_cuda_free,
    &torchmem_cuda_record_stream,
    &api_init,
    &api_empty_cache,
    &torchmem_set_memory_fraction,
    &torchmem_cuda_memory_fraction,
    &torchmem_cuda_largest_free_block,
    &torchmem_base_alloc,
    &api_stats,
    &torchmem_plugin_reset_peak,
    &torchmem_plugin_reset_accumulated,
    &api_live_blocks,
    &torchmem_cuda_capture_begin,
    &torchmem_cuda_capture_end,
    &torchmem_cuda_enable_peer_access,
    &torchmem_cuda_mem_info,
    &torchmem_cuda_last_message,
    &api_backend_name,
    &torchmem_cuda_trace_event,
    &api_stash_stack,
    &torchmem_pinned_alloc,
    &torchmem_pinned_free,
};
}  // namespace

extern "C" const void* torchmem_cuda_hook_api(void) { return &kApi; }
