// The CUDA plugin: the allocator torch.cuda.memory.CUDAPluggableAllocator
// loads from this module's shared library, and its backends.
//
// torch calls the exported C functions (torchmem_malloc / torchmem_free and
// the hooks) for every CUDA allocation, usually with the GIL released. Each
// call goes to a Backend (the stream-ordered CUDA allocator by default) and
// then to the process-wide gpu_recorder() as a "GPU" event. Nothing here runs
// Python code per event; the only Python call is the optional stack capture.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace torchmem {
namespace plugin {

enum class AllocStatus { Ok = 0, OutOfMemory = 1, Error = 2 };

// Where the memory comes from. Implementations are thread safe. A call that
// fails clears only its own error from the runtime's last-error slot.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // `*out` gets the block (never null on Ok; size > 0 always).
  virtual AllocStatus allocate(void** out, size_t size, int device, void* stream) = 0;
  virtual void deallocate(void* ptr, size_t size, int device, void* stream) = 0;
  // Orders later work on `waiter` after the work queued so far on `user`, a
  // stream of `user_device` (-1: unknown, found from the stream where the
  // runtime can say). False when it could not be arranged.
  virtual bool fence(int user_device, void* user, void* waiter) = 0;
  // The host waits for the work queued on `stream`: what the plugin falls
  // back to when a fence fails. False when even that failed.
  virtual bool sync_stream(int device, void* stream) = 0;
  // The per-device stream on which blocks used on several streams are freed
  // once it waits for all of them (torch's "unifying" free stream), created
  // on first use; null for backends whose free is not stream ordered.
  virtual void* unifying_stream(int device) { (void)device; return nullptr; }
  // Whether allocations may be made during CUDA graph capture; `why` says
  // what to use instead when not.
  virtual bool supports_capture(std::string* why) const { (void)why; return true; }
  // `device` may access memory of `peer` (pools included). False with `err`.
  virtual bool enable_peer_access(int device, int peer, std::string* err) {
    (void)device; (void)peer; (void)err;
    return true;
  }
  // Bytes one allocation could get now without failing; false when unknown.
  virtual bool largest_free(int device, uint64_t* bytes) {
    uint64_t total = 0;
    return mem_info(device, bytes, &total);
  }
  // Returns cached, unused memory of `device` to the system.
  virtual void release_cache(int device) = 0;
  // Device free / total bytes; false when unknown.
  virtual bool mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) = 0;
  // Bytes the backend holds from the system (pool reservation); false when
  // the backend holds nothing beyond the live blocks.
  virtual bool reserved(int device, uint64_t* current, uint64_t* high) {
    (void)device; (void)current; (void)high;
    return false;
  }
  virtual void reset_reserved_peak(int device) { (void)device; }
  // Last backend error text (CUDA error string), for messages.
  virtual std::string last_error() const { return {}; }
};

// Factories (cuda_backends.cpp). The CUDA ones return null when the runtime
// is missing; `why` says what is missing.
Backend* make_host_backend();
Backend* make_fake_backend();
Backend* make_sync_backend(std::string* why);
Backend* make_async_backend(std::string* why);

// The test-only fake backend's controls. Every call the fake backend gets
// is logged as one line of text (the first 100000 lines are kept).
std::vector<std::string> fake_log();
void fake_clear_log();
void fake_fail_next(int count);            // next `count` allocations fail
void fake_fail_fences(int count);          // next `count` fences fail
void fake_fail_syncs(int count);           // next `count` host waits fail
void fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes);
void fake_set_capture(bool supported);     // refuse capture like the sync backend

// Per-device counters kept by the plugin itself (independent of whether a
// profiler is enabled): what torch.cuda.memory_allocated and friends report
// while the plugin is the allocator. Bytes unless named *_count.
struct DeviceCounters {
  uint64_t current = 0;
  uint64_t peak = 0;
  uint64_t allocated = 0;
  uint64_t freed = 0;
  uint64_t alloc_count = 0;
  uint64_t free_count = 0;
  uint64_t oom_count = 0;
  uint64_t retry_count = 0;   // allocations that succeeded only after a cache release
  uint64_t reserved = 0;      // backend reservation now (== current without a pool)
  uint64_t reserved_peak = 0;
  uint64_t live_blocks = 0;
  uint64_t unknown_frees = 0;  // frees of pointers the plugin never handed out (all devices)
  uint64_t peak_live_blocks = 0;
  uint64_t deferred_frees = 0;   // blocks whose free waits for a graph capture to end
  uint64_t unfenced_blocks = 0;  // blocks kept for good: their free could not be ordered
  uint64_t limit = 0;            // memory-fraction limit in bytes; 0 = none
};
constexpr int kStatCount = 16;

constexpr int kMaxDevices = 64;

}  // namespace plugin
}  // namespace torchmem

// The C interface: what torch loads, plus controls a C++ benchmark or
// ctypes can call. All of them are safe from any thread and never throw,
// except torchmem_malloc on a final out-of-memory when the OOM mode says so.
extern "C" {

#define TORCHMEM_EXPORT __attribute__((visibility("default")))

// torch's alloc_fn: `size` bytes on `device` for work on `stream`. Returns
// null for size 0. On out of memory (after one cache release and retry) it
// records an OUT_OF_MEMORY event and throws a std::runtime_error whose text
// reads like torch's, or returns null when the OOM mode is 0 (tests).
TORCHMEM_EXPORT void* torchmem_malloc(size_t size, int device, void* stream);
// torch's free_fn; `size` may be wrong or 0: the plugin's own map decides.
TORCHMEM_EXPORT void torchmem_free(void* ptr, size_t size, int device, void* stream);
// Hooks of torch._C._cuda_CUDAAllocator (set_init_fn, set_reset_fn, ...).
TORCHMEM_EXPORT void torchmem_init(int device_count);
TORCHMEM_EXPORT void torchmem_reset(void);
TORCHMEM_EXPORT void torchmem_set_memory_fraction(double fraction, int device);
TORCHMEM_EXPORT void* torchmem_base_alloc(void* ptr, size_t* size);
TORCHMEM_EXPORT void torchmem_record_stream(void* ptr, void* stream);

// Controls. set_backend returns 0, -1 for an unknown name, -2 when blocks of
// another backend are still live, -3 when the backend cannot start here.
TORCHMEM_EXPORT int torchmem_plugin_set_backend(const char* name);
TORCHMEM_EXPORT const char* torchmem_plugin_backend(void);
TORCHMEM_EXPORT void torchmem_plugin_set_oom_throws(int throws);
// Copies the last out-of-memory message into `buf` (NUL terminated);
// returns its full length.
TORCHMEM_EXPORT size_t torchmem_plugin_last_oom_message(char* buf, size_t len);
// Fills `out` with the DeviceCounters fields in declaration order
// (kStatCount values); device -1 sums all devices. Returns the number
// written. allocated / freed / the counts / oom and retry counts are since the
// last torchmem_plugin_reset_accumulated of that device.
TORCHMEM_EXPORT int torchmem_plugin_stats(int device, uint64_t* out, int len);
TORCHMEM_EXPORT void torchmem_plugin_reset_peak(int device);
TORCHMEM_EXPORT void torchmem_plugin_reset_accumulated(int device);
TORCHMEM_EXPORT uint64_t torchmem_plugin_live_blocks(void);
// Which libcudart the plugin resolved (or why none), plus the last backend
// start error; copied like torchmem_plugin_last_oom_message.
TORCHMEM_EXPORT size_t torchmem_cuda_runtime_description(char* buf, size_t len);
// Benchmarks: n malloc + free pairs through the entry points (interleaved,
// or `batch` allocations then their frees); elapsed nanoseconds.
TORCHMEM_EXPORT uint64_t torchmem_plugin_bench(uint64_t n);
TORCHMEM_EXPORT uint64_t torchmem_plugin_bench_batched(uint64_t n, uint64_t batch);
// The fake backend's controls for ctypes (see plugin::fake_log and friends);
// fake_log copies the log, one call a line, NUL terminated, and returns its
// full length.
TORCHMEM_EXPORT size_t torchmem_fake_log(char* buf, size_t len);
TORCHMEM_EXPORT void torchmem_fake_clear(void);
TORCHMEM_EXPORT void torchmem_fake_fail_next(int count);
TORCHMEM_EXPORT void torchmem_fake_fail_fences(int count);
TORCHMEM_EXPORT void torchmem_fake_fail_syncs(int count);
TORCHMEM_EXPORT void torchmem_fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes);
TORCHMEM_EXPORT void torchmem_fake_set_capture(int supported);

// What the compiled allocator class and the trace tracker call
// (src/torchmem/_hook/cuda_hook_api.h has the table and each call's rules).
// torchmem_malloc / torchmem_free above are the same allocator for torch's
// C-function CUDAPluggableAllocator, the fallback when the class cannot be
// built.
TORCHMEM_EXPORT int torchmem_cuda_alloc(void** out, size_t size, int device, void* stream,
                                        unsigned flags);
TORCHMEM_EXPORT void torchmem_cuda_free(void* ptr);
TORCHMEM_EXPORT void torchmem_cuda_record_stream(void* ptr, void* stream, int stream_device);
TORCHMEM_EXPORT double torchmem_cuda_memory_fraction(int device);
TORCHMEM_EXPORT uint64_t torchmem_cuda_largest_free_block(int device);
TORCHMEM_EXPORT int torchmem_cuda_capture_begin(int device);
TORCHMEM_EXPORT void torchmem_cuda_capture_end(int device, void* capture_stream);
TORCHMEM_EXPORT int torchmem_cuda_enable_peer_access(int device, int peer);
TORCHMEM_EXPORT int torchmem_cuda_mem_info(int device, uint64_t* free_bytes,
                                           uint64_t* total_bytes);
TORCHMEM_EXPORT size_t torchmem_cuda_last_message(char* buf, size_t len);
// Up to `capacity` live blocks (a TorchmemBlock each), by address; returns
// how many exist. `out` may be null to count.
TORCHMEM_EXPORT size_t torchmem_cuda_live_blocks(void* out, size_t capacity);
TORCHMEM_EXPORT const void* torchmem_cuda_hook_api(void);
// Pinned host memory from the wrapped CUDA host allocator (cuda_pinned_bridge.cpp):
// 1 when recorded (the wrapper then reports the block's free).
TORCHMEM_EXPORT int torchmem_pinned_alloc(void* ptr, size_t size);
TORCHMEM_EXPORT void torchmem_pinned_free(void* ptr);
}
