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

// Where the memory comes from. Implementations are thread safe.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual const char* name() const = 0;
  // `*out` gets the block (never null on Ok; size > 0 always).
  virtual AllocStatus allocate(void** out, size_t size, int device, void* stream) = 0;
  virtual void deallocate(void* ptr, size_t size, int device, void* stream) = 0;
  // Orders later work on `waiter` after the work queued on `user` so far
  // (an event recorded on `user`, waited on by `waiter`).
  virtual void fence(int device, void* user, void* waiter) = 0;
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
void fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes);

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
};

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
// Fills `out` with the DeviceCounters fields in declaration order (12
// values); device -1 sums all devices. Returns the number written.
TORCHMEM_EXPORT int torchmem_plugin_stats(int device, uint64_t* out, int len);
TORCHMEM_EXPORT void torchmem_plugin_reset_peak(int device);
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
TORCHMEM_EXPORT void torchmem_fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes);
}
