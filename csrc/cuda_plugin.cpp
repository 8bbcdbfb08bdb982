// The CUDA plugin's entry points: bookkeeping, counters, record_stream, the
// out-of-memory path, and the hand-off to the recorder.
//
// Lock discipline: a call holds at most one shard lock at a time and never
// while it calls the backend, the recorder or Python, so neither torch
// (which may call us from several threads and from autograd's workers) nor a
// thread waiting on the GIL can deadlock against us.

// Python.h first: it sets feature macros the C library headers read.
#include <Python.h>

#include "cuda_plugin.hpp"

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "cuda_runtime.hpp"
#include "live_map.hpp"
#include "recorder.hpp"
#include "spin_lock.hpp"
#include "stack_capture.hpp"

namespace torchmem {
namespace plugin {
namespace {

// What the plugin knows about a live block. `backend` is the one that made
// it: a block is always returned to its own backend.
struct Block {
  uint64_t size = 0;
  uint64_t stream = 0;
  std::vector<uint64_t>* extra_streams = nullptr;  // record_stream; rare
  Backend* backend = nullptr;
  int16_t device = 0;
};

// Slot kMaxDevices collects devices outside [0, kMaxDevices).
inline int slot(int device) { return (device >= 0 && device < kMaxDevices) ? device : kMaxDevices; }

// Cumulative totals, kept per shard under the shard's lock (plain adds, no
// atomics) and summed when read. A block's alloc and free hit one shard.
struct ShardTotals {
  uint64_t allocated = 0, freed = 0, alloc_count = 0, free_count = 0;
};

// The pointer map is sharded so threads allocating at once (data loader
// pin threads, autograd's device threads, the main thread) rarely meet.
constexpr int kShards = 32;
struct alignas(64) Shard {
  SpinLock mu;
  AddressTable<Block> table;
  ShardTotals totals[kMaxDevices + 1];
};
// Immortal (never destroyed), like every piece of state the entry points
// touch: torch frees its last blocks (cuBLAS workspaces held by C++ statics)
// during static destruction at exit, possibly after this library's own
// destructors would have run.
Shard* const g_shards = new Shard[kShards];

inline Shard& shard_for(uint64_t address) {
  return g_shards[(hash_address(address) >> 40) & (kShards - 1)];
}

// What needs one value across threads: live bytes (for the peak and the
// memory-fraction limit), and the rare events.
struct alignas(64) DeviceState {
  std::atomic<uint64_t> current{0}, peak{0};
  std::atomic<uint64_t> oom_count{0}, retry_count{0};
  std::atomic<uint64_t> cap{0};  // memory-fraction limit in bytes; 0 = none
  std::atomic<bool> used{false};  // has had an allocation (empty_cache visits it)

  void add(uint64_t size) {
    uint64_t now = current.fetch_add(size, std::memory_order_relaxed) + size;
    uint64_t p = peak.load(std::memory_order_relaxed);
    while (now > p && !peak.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
    }
  }
  void remove(uint64_t size) { current.fetch_sub(size, std::memory_order_relaxed); }
};
DeviceState g_devices[kMaxDevices + 1];

inline DeviceState& state_for(int device) { return g_devices[slot(device)]; }

// Sum of the shard totals of a device slot (-1: every slot).
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

std::atomic<Backend*> g_backend{nullptr};
std::mutex g_backend_mu;
std::string& g_backend_error = *new std::string;  // why the default backend could not start
std::atomic<int> g_oom_throws{1};
std::atomic<uint64_t> g_unknown_frees{0};
std::atomic<int> g_device_count{0};
std::mutex g_oom_mu;
std::string& g_last_oom = *new std::string;

// Set by an atexit handler registered at the first allocation: from then on
// the recorder (destroyed with the other statics) is left alone, and blocks
// freed during teardown only go back to their backend.
std::atomic<bool> g_exiting{false};

inline Recorder* live_recorder() {
  return g_exiting.load(std::memory_order_relaxed) ? nullptr : gpu_recorder();
}

uint64_t live_blocks_of(int device) {
  ShardTotals t = sum_totals(slot(device));
  return t.alloc_count - t.free_count;
}

uint64_t total_live_blocks() {
  ShardTotals t = sum_totals(-1);
  return t.alloc_count - t.free_count;
}

Backend* make_backend(const std::string& name, std::string* why) {
  if (name == "host") return make_host_backend();
  if (name == "fake") return make_fake_backend();
  if (name == "sync") return make_sync_backend(why);
  if (name == "async") return make_async_backend(why);
  *why = "unknown backend '" + name + "' (expected async, sync, host or fake)";
  return nullptr;
}

// First use without set_backend: TORCHMEM_CUDA_BACKEND, else async, else
// sync (a runtime without the stream-ordered allocator).
Backend* backend() {
  Backend* b = g_backend.load(std::memory_order_acquire);
  if (b) return b;
  std::lock_guard<std::mutex> lock(g_backend_mu);
  b = g_backend.load();
  if (b) return b;
  const char* env = std::getenv("TORCHMEM_CUDA_BACKEND");
  std::string name = (env && *env) ? env : "async";
  std::string why;
  b = make_backend(name, &why);
  if (!b && name == "async") b = make_sync_backend(&why);
  if (!b) {
    g_backend_error = why;
    return nullptr;
  }
  g_backend.store(b, std::memory_order_release);
  return b;
}

// The same units and rounding as torch's c10 format_size, so the message
// reads like torch's own.
std::string format_size(uint64_t size) {
  char buf[64];
  if (size <= 1024) {
    std::snprintf(buf, sizeof buf, "%llu bytes", static_cast<unsigned long long>(size));
  } else if (size <= 1048576) {
    std::snprintf(buf, sizeof buf, "%.2f KiB", size / 1024.0);
  } else if (size <= 1073741824ULL) {
    std::snprintf(buf, sizeof buf, "%.2f MiB", size / 1048576.0);
  } else {
    std::snprintf(buf, sizeof buf, "%.2f GiB", size / 1073741824.0);
  }
  return buf;
}

// torch's pluggable wrapper does not check for null (it would hand out a
// tensor without memory), so the failure has to be an exception. c10's
// OutOfMemoryError cannot be thrown without linking libc10, so torch turns
// this into a RuntimeError carrying the message (pytorch issue 133280: the
// same holds for every pluggable allocator, RMM included).
class CudaOutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

void* fail(AllocStatus status, Backend* b, size_t size, int device, void* stream,
           uint32_t stack, bool over_cap) {
  DeviceState& c = state_for(device);
  std::string msg;
  if (status == AllocStatus::OutOfMemory) {
    c.oom_count.fetch_add(1, std::memory_order_relaxed);
    uint64_t free_b = 0, total_b = 0;
    bool known = b && b->mem_info(device, &free_b, &total_b);
    uint64_t live = c.current.load(std::memory_order_relaxed);
    if (Recorder* r = live_recorder()) {
      if (r->enabled()) {
        OomInfo info{};
        info.requested = size;
        info.device = static_cast<int16_t>(device);
        info.stream = reinterpret_cast<uint64_t>(stream);
        info.device_free = known ? free_b : 0;
        info.device_total = known ? total_b : 0;
        info.live_bytes = live;
        info.stack_id = stack;
        r->record_oom(info, kTypeGPU);
      }
    }
    msg = "CUDA out of memory. Tried to allocate " + format_size(size) + " on device " +
          std::to_string(device) + ".";
    if (known) {
      msg += " GPU " + std::to_string(device) + " has a total capacity of " +
             format_size(total_b) + " of which " + format_size(free_b) + " is free.";
    }
    msg += " Of the allocated memory " + format_size(live) +
           " is allocated by PyTorch (torchmem plugin, " +
           std::to_string(live_blocks_of(device)) + " live blocks).";
    if (over_cap) {
      msg += " The limit set by torch.cuda.set_per_process_memory_fraction is " +
             format_size(c.cap.load()) + ".";
    } else {
      msg += " The plugin released its cached memory and retried once.";
    }
    msg += std::string(" [backend ") + (b ? b->name() : "none") + "]";
  } else {
    msg = "torchmem CUDA plugin: allocation of " + format_size(size) + " on device " +
          std::to_string(device) + " failed: " +
          (b ? b->last_error() : "no CUDA runtime: " + g_backend_error);
  }
  {
    std::lock_guard<std::mutex> lock(g_oom_mu);
    g_last_oom = msg;
  }
  if (g_oom_throws.load(std::memory_order_relaxed)) throw CudaOutOfMemory(msg);
  return nullptr;
}

}  // namespace
}  // namespace plugin
}  // namespace torchmem

using namespace torchmem;
using namespace torchmem::plugin;

extern "C" {

void* torchmem_malloc(size_t size, int device, void* stream) {
  // torch asks for 0 bytes for empty tensors; a null data pointer is what it
  // expects back, and it never frees a null pointer.
  if (size == 0) return nullptr;
  static const bool at_exit_registered =
      std::atexit([] { g_exiting.store(true, std::memory_order_relaxed); }) == 0;
  (void)at_exit_registered;
  Backend* b = backend();
  Recorder* rec = live_recorder();
  uint32_t stack = (rec && rec->enabled()) ? capture_stack_in_allocator() : 0;
  if (!b) return fail(AllocStatus::Error, nullptr, size, device, stream, stack, false);
  DeviceState& c = state_for(device);
  if (!c.used.load(std::memory_order_relaxed)) c.used.store(true, std::memory_order_relaxed);
  uint64_t cap = c.cap.load(std::memory_order_relaxed);
  if (cap && c.current.load(std::memory_order_relaxed) + size > cap) {
    return fail(AllocStatus::OutOfMemory, b, size, device, stream, stack, true);
  }
  void* p = nullptr;
  AllocStatus st = b->allocate(&p, size, device, stream);
  if (st == AllocStatus::OutOfMemory) {
    b->release_cache(device);
    st = b->allocate(&p, size, device, stream);
    if (st == AllocStatus::Ok) c.retry_count.fetch_add(1, std::memory_order_relaxed);
  }
  if (st != AllocStatus::Ok) return fail(st, b, size, device, stream, stack, false);

  const uint64_t addr = reinterpret_cast<uint64_t>(p);
  Block blk;
  blk.size = size;
  blk.stream = reinterpret_cast<uint64_t>(stream);
  blk.backend = b;
  blk.device = static_cast<int16_t>(device);
  Shard& s = shard_for(addr);
  {
    std::lock_guard<SpinLock> lock(s.mu);
    s.table.put(addr, blk);
    ShardTotals& t = s.totals[slot(device)];
    t.allocated += size;
    ++t.alloc_count;
  }
  c.add(size);
  // After the backend handed the block out and before anyone can free it:
  // the recorder sees alloc and free of one address in order.
  if (rec && rec->enabled()) {
    rec->record_alloc(addr, size, kTypeGPU, static_cast<int16_t>(device), blk.stream, stack);
  }
  return p;
}

void torchmem_free(void* ptr, size_t size, int device, void* stream) {
  if (!ptr) return;
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  Block blk;
  bool known;
  {
    Shard& s = shard_for(addr);
    std::lock_guard<SpinLock> lock(s.mu);
    known = s.table.erase(addr, &blk);
    if (known) {
      ShardTotals& t = s.totals[slot(blk.device)];
      t.freed += blk.size;
      ++t.free_count;
    }
  }
  Recorder* rec = live_recorder();
  if (!known) {
    // Not ours: handing it to a backend could crash; leak it and report.
    g_unknown_frees.fetch_add(1, std::memory_order_relaxed);
    if (rec && rec->enabled()) rec->record_free(addr, static_cast<int64_t>(size));
    (void)device;
    (void)stream;
    return;
  }
  state_for(blk.device).remove(blk.size);
  // Before the backend may hand the address out again (see torchmem_malloc).
  // torch's own size is passed on so that a disagreement shows as an anomaly.
  if (rec && rec->enabled()) {
    rec->record_free(addr, size ? static_cast<int64_t>(size) : -1);
  }
  void* free_stream = reinterpret_cast<void*>(blk.stream);
  if (blk.extra_streams) {
    for (uint64_t other : *blk.extra_streams) {
      blk.backend->fence(blk.device, reinterpret_cast<void*>(other), free_stream);
    }
    delete blk.extra_streams;
  }
  blk.backend->deallocate(ptr, blk.size, blk.device, free_stream);
}

void torchmem_init(int device_count) {
  // Pools are set up lazily per device: touching one here would create a
  // CUDA context on every GPU of the machine.
  g_device_count.store(device_count, std::memory_order_relaxed);
}

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
    return;
  }
  uint64_t cap = static_cast<uint64_t>(fraction * static_cast<double>(total_b));
  c.cap.store(cap ? cap : 1);  // fraction 0 allows nothing, as in torch
}

void* torchmem_base_alloc(void* ptr, size_t* size) {
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  Shard& s = shard_for(addr);
  std::lock_guard<SpinLock> lock(s.mu);
  if (const Block* blk = s.table.find(addr)) {
    if (size) *size = blk->size;
  }
  return ptr;  // every block is its own segment
}

void torchmem_record_stream(void* ptr, void* stream) {
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  const uint64_t st = reinterpret_cast<uint64_t>(stream);
  Shard& s = shard_for(addr);
  std::lock_guard<SpinLock> lock(s.mu);
  Block* blk = s.table.find(addr);
  if (!blk || blk->stream == st) return;
  if (!blk->extra_streams) blk->extra_streams = new std::vector<uint64_t>();
  auto& v = *blk->extra_streams;
  if (std::find(v.begin(), v.end(), st) == v.end()) v.push_back(st);
}

int torchmem_plugin_set_backend(const char* name) {
  if (!name) return -1;
  std::string why;
  std::string n(name);
  if (n != "async" && n != "sync" && n != "host" && n != "fake") return -1;
  Backend* b = make_backend(n, &why);
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

void torchmem_plugin_set_oom_throws(int throws) { g_oom_throws.store(throws ? 1 : 0); }

size_t torchmem_plugin_last_oom_message(char* buf, size_t len) {
  std::lock_guard<std::mutex> lock(g_oom_mu);
  if (buf && len) {
    size_t n = std::min(len - 1, g_last_oom.size());
    std::memcpy(buf, g_last_oom.data(), n);
    buf[n] = '\0';
  }
  return g_last_oom.size();
}

int torchmem_plugin_stats(int device, uint64_t* out, int len) {
  DeviceCounters d;
  auto add = [&d](const DeviceState& c) {
    d.current += c.current.load(std::memory_order_relaxed);
    d.peak += c.peak.load(std::memory_order_relaxed);  // summed over devices: an upper bound
    d.oom_count += c.oom_count.load(std::memory_order_relaxed);
    d.retry_count += c.retry_count.load(std::memory_order_relaxed);
  };
  if (device < 0) {
    for (const DeviceState& c : g_devices) add(c);
  } else {
    add(state_for(device));
  }
  ShardTotals t = sum_totals(device < 0 ? -1 : slot(device));
  d.allocated = t.allocated;
  d.freed = t.freed;
  d.alloc_count = t.alloc_count;
  d.free_count = t.free_count;
  d.live_blocks = t.alloc_count - t.free_count;
  d.unknown_frees = g_unknown_frees.load(std::memory_order_relaxed);
  d.reserved = d.current;
  d.reserved_peak = d.peak;
  Backend* b = g_backend.load(std::memory_order_acquire);
  uint64_t rc = 0, rh = 0;
  if (b && device >= 0 && b->reserved(device, &rc, &rh)) {
    d.reserved = rc;
    d.reserved_peak = rh;
  }
  const uint64_t values[] = {d.current,    d.peak,      d.allocated,   d.freed,
                             d.alloc_count, d.free_count, d.oom_count, d.retry_count,
                             d.reserved,   d.reserved_peak, d.live_blocks, d.unknown_frees};
  int n = std::min<int>(len, sizeof(values) / sizeof(values[0]));
  for (int i = 0; i < n; ++i) out[i] = values[i];
  return n;
}

void torchmem_plugin_reset_peak(int device) {
  auto reset = [](DeviceState& c) {
    c.peak.store(c.current.load(std::memory_order_relaxed), std::memory_order_relaxed);
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

uint64_t torchmem_plugin_live_blocks(void) { return total_live_blocks(); }

size_t torchmem_cuda_runtime_description(char* buf, size_t len) {
  std::string text = cuda::runtime_description();
  {
    std::lock_guard<std::mutex> lock(g_backend_mu);
    if (!g_backend_error.empty()) text += "; last backend error: " + g_backend_error;
  }
  if (buf && len) {
    size_t n = std::min(len - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return text.size();
}

}  // extern "C"
