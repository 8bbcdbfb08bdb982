// The CUDA plugin's allocation and free paths: bookkeeping, the
// out-of-memory path, record_stream fencing, CUDA graph capture, and the
// hand-off to the recorder. Counters and controls: cuda_plugin_stats.cpp.
// Over 400 lines on purpose: these paths share the file-local hot helpers
// (inlined into each entry point) and the lock discipline below, kept in one place.
//
// Lock discipline: a call holds at most one shard lock at a time and never
// while it calls the backend, the recorder or Python, so neither torch
// (which may call us from several threads and from autograd's workers) nor a
// thread waiting on the GIL can deadlock against us. The capture lock is
// taken only around capture bookkeeping, never with a shard lock held.

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
#include <utility>
#include <vector>

#include "../src/torchmem/_hook/cuda_hook_api.h"
#include "cuda_plugin_state.hpp"
#include "cuda_runtime.hpp"
#include "stack_capture.hpp"

#define TORCHMEM_LIKELY(x) __builtin_expect(!!(x), 1)
// The hot paths, inlined into each entry point (torch's C-function one and
// the compiled class's): a call and a return less per allocation and free.
#define TORCHMEM_HOT inline __attribute__((always_inline))

namespace torchmem {
namespace plugin {

Shard* const g_shards = new Shard[kShards];
DeviceState g_devices[kMaxDevices + 1];
std::atomic<Backend*> g_backend{nullptr};
std::mutex g_backend_mu;
std::string& g_backend_error = *new std::string;
std::atomic<uint64_t> g_unknown_frees{0};
std::atomic<uint64_t> g_deferred{0};
std::atomic<uint64_t> g_unfenced{0};
std::mutex g_oom_mu;
std::string& g_last_oom = *new std::string;

namespace {

std::atomic<int> g_oom_throws{1};

// Set by an atexit handler registered at the first allocation: from then on
// the recorder (destroyed with the other statics) is left alone, and blocks
// freed during teardown only go back to their backend.
std::atomic<bool> g_exiting{false};

inline Recorder* live_recorder() {
  return g_exiting.load(std::memory_order_relaxed) ? nullptr : gpu_recorder();
}

// -- CUDA graph capture --------------------------------------------------------
// While any capture is underway (torch's beginAllocateToPool .. endAllocateToPool),
// a block allocated before it must not be freed: cudaFreeAsync on a capturing
// stream of memory the graph did not allocate invalidates the capture (torch's
// cudaMallocAsync backend has the same rule). Such frees wait in `deferred`
// and run when the last capture ends. Streams captured blocks were freed on
// are remembered so that they rejoin the capture stream at its end.
struct CaptureState {
  std::mutex mu;
  std::atomic<int> underway{0};
  std::vector<uint64_t> deferred;         // addresses, in the order freed
  std::vector<UseStream> free_streams;    // streams frees were queued on during capture
};
CaptureState& g_capture = *new CaptureState;

thread_local std::string* t_last_message = nullptr;

Backend* make_backend(const std::string& name, std::string* why) {
  if (name == "host") return make_host_backend();
  if (name == "fake") return make_fake_backend();
  if (name == "sync") return make_sync_backend(why);
  if (name == "async") return make_async_backend(why);
  *why = "unknown backend '" + name + "' (expected async, sync, host or fake)";
  return nullptr;
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

uint64_t live_blocks_of(int device) {
  return state_for(device).blocks.load(std::memory_order_relaxed);
}

// Records a final failure and composes its message (torch's wording for an
// out of memory). Returns the status for the caller to report.
AllocStatus fail(AllocStatus status, Backend* b, size_t size, int device, void* stream,
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
  set_last_message(msg);
  return status;
}

// The frees that waited for captures to end, once none is left.
void run_deferred_frees();

// Orders the reuse of a block used on several streams after all of them:
// every stream's queued work is fenced into `waiter` (the backend's unifying
// stream, or the block's own stream where the free is not stream ordered).
// A fence that fails falls back to a host wait for that stream; false when
// even that failed, so the block must never be handed out again.
bool fence_uses(Backend* b, const Block& blk, void* waiter) {
  bool ok = true;
  auto order = [&](int device, uint64_t stream) {
    void* s = reinterpret_cast<void*>(stream);
    if (s == waiter) return;
    if (b->fence(device, s, waiter)) return;
    if (!b->sync_stream(device, s)) ok = false;
  };
  if (waiter != reinterpret_cast<void*>(blk.stream)) order(blk.device, blk.stream);
  for (const UseStream& u : *blk.extra_streams) order(u.device, u.stream);
  return ok;
}

// The free proper: counters, recorder, fences, backend. `blk` is already out
// of the map.
TORCHMEM_HOT void release(void* ptr, Block& blk, int64_t torch_size) {
  state_for(blk.device).remove(blk.size);
  // Before the backend may hand the address out again (see torchmem_malloc).
  // torch's own size is passed on so that a disagreement shows as an anomaly.
  if (Recorder* rec = live_recorder()) {
    if (rec->enabled()) rec->record_free(reinterpret_cast<uint64_t>(ptr), torch_size);
  }
  void* free_stream = reinterpret_cast<void*>(blk.stream);
  if (blk.extra_streams) {
    // torch's rule: a block used on several streams is freed on a per-device
    // stream that waits for all of them, so no user stream waits on another.
    void* unifying = blk.backend->unifying_stream(blk.device);
    void* waiter = unifying ? unifying : free_stream;
    bool ordered = fence_uses(blk.backend, blk, waiter);
    delete blk.extra_streams;
    blk.extra_streams = nullptr;
    if (!ordered) {
      // Neither an event nor a host wait could order the other streams' work
      // before reuse: keeping the memory is the only safe choice.
      g_unfenced.fetch_add(1, std::memory_order_relaxed);
      set_last_message("torchmem CUDA plugin: a block used on several streams could not be "
                       "fenced; its memory is kept rather than reused early");
      return;
    }
    free_stream = waiter;
  }
  if (g_capture.underway.load(std::memory_order_acquire) > 0) {
    std::lock_guard<std::mutex> lock(g_capture.mu);
    UseStream fs{reinterpret_cast<uint64_t>(free_stream), blk.device};
    bool seen = false;
    for (const UseStream& u : g_capture.free_streams)
      seen = seen || (u.stream == fs.stream && u.device == fs.device);
    if (!seen) g_capture.free_streams.push_back(fs);
  }
  blk.backend->deallocate(ptr, blk.size, blk.device, free_stream);
}

void run_deferred_frees() {
  std::vector<uint64_t> todo;
  {
    std::lock_guard<std::mutex> lock(g_capture.mu);
    if (g_capture.underway.load() > 0) return;
    todo.swap(g_capture.deferred);
  }
  for (uint64_t addr : todo) {
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
    if (!known) continue;
    g_deferred.fetch_sub(1, std::memory_order_relaxed);
    release(reinterpret_cast<void*>(addr), blk, -1);
  }
}

// The allocation path shared by torch's C-function interface and the
// compiled allocator class.
TORCHMEM_HOT AllocStatus allocate_block(void** out, size_t size, int device, void* stream,
                                       unsigned flags) {
  static const bool at_exit_registered =
      std::atexit([] { g_exiting.store(true, std::memory_order_relaxed); }) == 0;
  (void)at_exit_registered;
  *out = nullptr;
  // A deferred free can run as soon as no capture is left; the next
  // allocation is the first moment that is sure to be outside one.
  if (g_deferred.load(std::memory_order_relaxed) != 0 &&
      g_capture.underway.load(std::memory_order_acquire) == 0) {
    run_deferred_frees();
  }
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
  if (st == AllocStatus::OutOfMemory && !(flags & TORCHMEM_ALLOC_CAPTURED)) {
    // Releasing the cache synchronises the device: not allowed while the
    // stream is being captured, so a captured allocation fails at once.
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
  blk.captured = (flags & TORCHMEM_ALLOC_CAPTURED) ? 1 : 0;
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
  *out = p;
  return AllocStatus::Ok;
}

TORCHMEM_HOT void free_block(void* ptr, int64_t torch_size) {
  if (!ptr) return;
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  const bool capturing = g_capture.underway.load(std::memory_order_acquire) > 0;
  Block blk;
  bool known;
  bool defer = false;
  {
    Shard& s = shard_for(addr);
    std::lock_guard<SpinLock> lock(s.mu);
    if (TORCHMEM_LIKELY(!capturing)) {
      known = s.table.erase(addr, &blk);  // one lookup on the common path
      if (known && blk.deferred) {
        s.table.put(addr, blk);  // already waiting for its capture: not freed twice
        known = false;
      }
    } else {
      Block* live = s.table.find(addr);
      known = live != nullptr && !live->deferred;
      if (known && !live->captured) {
        live->deferred = 1;  // stays in the map (its memory is still held)
        defer = true;
      } else if (known) {
        s.table.erase(addr, &blk);
      }
    }
    if (known && !defer) {
      ShardTotals& t = s.totals[slot(blk.device)];
      t.freed += blk.size;
      ++t.free_count;
    }
  }
  if (defer) {
    std::lock_guard<std::mutex> lock(g_capture.mu);
    g_capture.deferred.push_back(addr);
    g_deferred.fetch_add(1, std::memory_order_relaxed);
    return;
  }
  if (!known) {
    // Not ours (or freed twice during a capture): handing it to a backend
    // could crash; leak it and report.
    g_unknown_frees.fetch_add(1, std::memory_order_relaxed);
    if (Recorder* rec = live_recorder()) {
      if (rec->enabled()) rec->record_free(addr, torch_size);
    }
    return;
  }
  release(ptr, blk, torch_size);
}

}  // namespace

void set_last_message(const std::string& text) {
  if (!t_last_message) t_last_message = new std::string;  // per thread, leaked at exit
  *t_last_message = text;
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

Backend* backend_by_name(const std::string& name, std::string* why) {
  return make_backend(name, why);
}

}  // namespace plugin
}  // namespace torchmem

using namespace torchmem;
using namespace torchmem::plugin;

namespace {
// torch's C-function wrapper does not check for null (it would hand out a
// tensor without memory), so a failure there has to be an exception. It
// becomes a RuntimeError carrying the message: the compiled allocator class
// (src/torchmem/_hook/cuda_allocator.cpp) throws c10::OutOfMemoryError instead.
class CudaOutOfMemory : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
}  // namespace

extern "C" {

void* torchmem_malloc(size_t size, int device, void* stream) {
  // torch asks for 0 bytes for empty tensors; a null data pointer is what it
  // expects back, and it never frees a null pointer.
  if (size == 0) return nullptr;
  void* p = nullptr;
  if (allocate_block(&p, size, device, stream, 0) == AllocStatus::Ok) return p;
  if (g_oom_throws.load(std::memory_order_relaxed)) {
    std::lock_guard<std::mutex> lock(g_oom_mu);
    throw CudaOutOfMemory(g_last_oom);
  }
  return nullptr;
}

void torchmem_free(void* ptr, size_t size, int device, void* stream) {
  (void)device;
  (void)stream;
  free_block(ptr, size ? static_cast<int64_t>(size) : -1);
}

int torchmem_cuda_alloc(void** out, size_t size, int device, void* stream, unsigned flags) {
  if (!out) return TORCHMEM_ALLOC_ERROR;
  *out = nullptr;
  if (size == 0) return TORCHMEM_ALLOC_OK;
  AllocStatus st = allocate_block(out, size, device, stream, flags);
  return st == AllocStatus::Ok ? TORCHMEM_ALLOC_OK
         : st == AllocStatus::OutOfMemory ? TORCHMEM_ALLOC_OOM
                                          : TORCHMEM_ALLOC_ERROR;
}

void torchmem_cuda_free(void* ptr) { free_block(ptr, -1); }

void torchmem_init(int device_count) {
  // Pools are set up lazily per device: touching one here would create a
  // CUDA context on every GPU of the machine.
  (void)device_count;
}

void torchmem_cuda_record_stream(void* ptr, void* stream, int stream_device) {
  const uint64_t addr = reinterpret_cast<uint64_t>(ptr);
  const uint64_t st = reinterpret_cast<uint64_t>(stream);
  Shard& s = shard_for(addr);
  std::lock_guard<SpinLock> lock(s.mu);
  Block* blk = s.table.find(addr);
  if (!blk || (blk->stream == st && (stream_device < 0 || stream_device == blk->device))) return;
  if (!blk->extra_streams) blk->extra_streams = new std::vector<UseStream>();
  auto& v = *blk->extra_streams;
  for (const UseStream& u : v)
    if (u.stream == st && u.device == stream_device) return;
  v.push_back(UseStream{st, stream_device});
}

void torchmem_record_stream(void* ptr, void* stream) {
  // torch's C-function interface does not say the stream's device.
  torchmem_cuda_record_stream(ptr, stream, -1);
}

int torchmem_cuda_capture_begin(int device) {
  Backend* b = backend();
  std::string why;
  if (!b) {
    set_last_message("torchmem CUDA plugin: no CUDA runtime: " + g_backend_error);
    return -1;
  }
  if (!b->supports_capture(&why)) {
    set_last_message(why);
    return -1;
  }
  (void)device;
  std::lock_guard<std::mutex> lock(g_capture.mu);
  g_capture.underway.fetch_add(1, std::memory_order_acq_rel);
  return 0;
}

void torchmem_cuda_capture_end(int device, void* capture_stream) {
  std::vector<UseStream> streams;
  {
    std::lock_guard<std::mutex> lock(g_capture.mu);
    if (g_capture.underway.load() <= 0) return;
    g_capture.underway.fetch_sub(1, std::memory_order_acq_rel);
    streams.swap(g_capture.free_streams);
  }
  // Work a capture queued on other streams (frees on side streams) joins the
  // capture stream again, as torch's cudaMallocAsync backend does.
  Backend* b = g_backend.load(std::memory_order_acquire);
  if (b) {
    for (const UseStream& u : streams) {
      if (reinterpret_cast<void*>(u.stream) == capture_stream) continue;
      if (!b->fence(u.device, reinterpret_cast<void*>(u.stream), capture_stream)) {
        set_last_message("torchmem CUDA plugin: a stream freed on during capture could not "
                         "rejoin the capture stream");
      }
    }
  }
  (void)device;
  run_deferred_frees();
}

void torchmem_plugin_set_oom_throws(int throws) { g_oom_throws.store(throws ? 1 : 0); }

size_t torchmem_cuda_last_message(char* buf, size_t len) {
  const std::string empty;
  const std::string& text = t_last_message ? *t_last_message : empty;
  if (buf && len) {
    size_t n = std::min(len - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return text.size();
}

}  // extern "C"
