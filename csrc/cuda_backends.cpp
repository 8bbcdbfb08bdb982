// The plugin's backends: async (cudaMallocAsync on the device's default
// pool), sync (cudaMalloc), host (malloc, for CPU tests) and fake (logs its
// calls and fails on demand, for tests of ordering and out of memory).
//
// Each backend is a process-lifetime singleton: blocks allocated by one must
// be freed by it even after the plugin has moved on to another.
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "cuda_plugin.hpp"
#include "cuda_runtime.hpp"

namespace torchmem {
namespace plugin {
namespace {

using cuda::DeviceGuard;
using cuda::Runtime;

class HostBackend final : public Backend {
 public:
  const char* name() const override { return "host"; }
  AllocStatus allocate(void** out, size_t size, int, void*) override {
    *out = std::malloc(size);
    return *out ? AllocStatus::Ok : AllocStatus::OutOfMemory;
  }
  void deallocate(void* ptr, size_t, int, void*) override { std::free(ptr); }
  void fence(int, void*, void*) override {}
  void release_cache(int) override {}
  bool mem_info(int, uint64_t*, uint64_t*) override { return false; }
};

class FakeBackend final : public Backend {
 public:
  const char* name() const override { return "fake"; }

  AllocStatus allocate(void** out, size_t size, int device, void* stream) override {
    bool fail = false;
    int left = fail_next_.load();
    while (left > 0 && !fail) {
      fail = fail_next_.compare_exchange_weak(left, left - 1);
    }
    // Synthetic addresses, never reused: the fake never touches memory, and
    // distinct addresses keep the plugin's map and the recorder exact.
    uint64_t addr = 0;
    if (!fail) addr = kBase + next_.fetch_add(1) * kStride;
    char line[160];
    std::snprintf(line, sizeof line, "malloc size=%zu device=%d stream=%" PRIu64 " -> %s",
                  size, device, reinterpret_cast<uint64_t>(stream), fail ? "oom" : "ok");
    log(line);
    if (fail) return AllocStatus::OutOfMemory;
    *out = reinterpret_cast<void*>(addr);
    return AllocStatus::Ok;
  }
  void deallocate(void* ptr, size_t size, int device, void* stream) override {
    char line[160];
    std::snprintf(line, sizeof line, "free ptr=0x%" PRIx64 " size=%zu device=%d stream=%" PRIu64,
                  reinterpret_cast<uint64_t>(ptr), size, device,
                  reinterpret_cast<uint64_t>(stream));
    log(line);
  }
  void fence(int device, void* user, void* waiter) override {
    char line[160];
    std::snprintf(line, sizeof line, "fence device=%d user=%" PRIu64 " waiter=%" PRIu64, device,
                  reinterpret_cast<uint64_t>(user), reinterpret_cast<uint64_t>(waiter));
    log(line);
  }
  void release_cache(int device) override {
    char line[64];
    std::snprintf(line, sizeof line, "release_cache device=%d", device);
    log(line);
  }
  bool mem_info(int, uint64_t* free_bytes, uint64_t* total_bytes) override {
    *free_bytes = free_.load();
    *total_bytes = total_.load();
    return *total_bytes != 0;
  }

  std::vector<std::string> log_copy() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    log_.clear();
  }
  void fail_next(int n) { fail_next_.store(n < 0 ? 0 : n); }
  void set_mem_info(uint64_t f, uint64_t t) {
    free_.store(f);
    total_.store(t);
  }

 private:
  static constexpr uint64_t kBase = 0x7e0000000000ULL;
  static constexpr uint64_t kStride = 0x100000ULL;  // 1 MiB apart
  void log(const char* line) {
    std::lock_guard<std::mutex> lock(mu_);
    // Bounded so a benchmark run through the fake cannot exhaust memory.
    if (log_.size() < 100000) log_.emplace_back(line);
  }
  std::mutex mu_;
  std::vector<std::string> log_;
  std::atomic<int> fail_next_{0};
  std::atomic<uint64_t> next_{0};
  std::atomic<uint64_t> free_{0};
  std::atomic<uint64_t> total_{0};
};

// Shared by the CUDA backends: error text and the device-memory query.
class CudaBackendBase : public Backend {
 public:
  explicit CudaBackendBase(const Runtime* rt) : rt_(rt) {}
  bool mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) override {
    DeviceGuard guard(rt_, device);
    size_t f = 0, t = 0;
    if (rt_->MemGetInfo(&f, &t) != cuda::kSuccess) {
      rt_->GetLastError();
      return false;
    }
    *free_bytes = f;
    *total_bytes = t;
    return true;
  }
  std::string last_error() const override {
    std::lock_guard<std::mutex> lock(err_mu_);
    return last_error_;
  }

 protected:
  // Classifies a failed call and clears the runtime's sticky last error, so
  // torch's next kernel-launch check does not report our failure as its own.
  AllocStatus failed(cuda::Error err, const char* what) {
    rt_->GetLastError();
    std::lock_guard<std::mutex> lock(err_mu_);
    last_error_ = std::string(what) + ": " + rt_->GetErrorString(err);
    return err == cuda::kErrorMemoryAllocation ? AllocStatus::OutOfMemory : AllocStatus::Error;
  }
  const Runtime* rt_;
  mutable std::mutex err_mu_;
  std::string last_error_;
};

class SyncBackend final : public CudaBackendBase {
 public:
  using CudaBackendBase::CudaBackendBase;
  const char* name() const override { return "sync"; }
  AllocStatus allocate(void** out, size_t size, int device, void*) override {
    DeviceGuard guard(rt_, device);
    cuda::Error err = rt_->Malloc(out, size);
    if (err != cuda::kSuccess) return failed(err, "cudaMalloc");
    return AllocStatus::Ok;
  }
  void deallocate(void* ptr, size_t, int device, void*) override {
    DeviceGuard guard(rt_, device);
    cuda::Error err = rt_->Free(ptr);
    if (err != cuda::kSuccess) failed(err, "cudaFree");
  }
  // cudaFree is not stream ordered, so the host waits for the other
  // stream's work before the block goes back.
  void fence(int device, void* user, void*) override {
    DeviceGuard guard(rt_, device);
    cuda::Event ev = nullptr;
    if (rt_->EventCreateWithFlags(&ev, cuda::kEventDisableTiming) != cuda::kSuccess) {
      rt_->GetLastError();
      rt_->StreamSynchronize(user);
      return;
    }
    rt_->EventRecord(ev, user);
    rt_->EventSynchronize(ev);
    rt_->EventDestroy(ev);
  }
  void release_cache(int) override {}
};

class AsyncBackend final : public CudaBackendBase {
 public:
  using CudaBackendBase::CudaBackendBase;
  const char* name() const override { return "async"; }

  AllocStatus allocate(void** out, size_t size, int device, void* stream) override {
    if (device < 0 || device >= kMaxDevices) return AllocStatus::Error;
    DeviceGuard guard(rt_, device);
    if (!pool(device)) {
      cuda::Error err = rt_->Malloc(out, size);  // no pools on this device
      return err == cuda::kSuccess ? AllocStatus::Ok : failed(err, "cudaMalloc");
    }
    cuda::Error err = rt_->MallocAsync(out, size, stream);
    if (err != cuda::kSuccess) return failed(err, "cudaMallocAsync");
    return AllocStatus::Ok;
  }
  void deallocate(void* ptr, size_t, int device, void* stream) override {
    DeviceGuard guard(rt_, device);
    bool pooled = device >= 0 && device < kMaxDevices && state_[device].load() == kPooled;
    cuda::Error err = pooled ? rt_->FreeAsync(ptr, stream) : rt_->Free(ptr);
    if (err != cuda::kSuccess) failed(err, pooled ? "cudaFreeAsync" : "cudaFree");
  }
  void fence(int device, void* user, void* waiter) override {
    DeviceGuard guard(rt_, device);
    cuda::Event ev = nullptr;
    if (rt_->EventCreateWithFlags(&ev, cuda::kEventDisableTiming) != cuda::kSuccess) {
      rt_->GetLastError();
      rt_->StreamSynchronize(user);  // correct, only slower
      return;
    }
    rt_->EventRecord(ev, user);
    rt_->StreamWaitEvent(waiter, ev, 0);
    // Destroying a recorded event is safe: its resources go once it completes.
    rt_->EventDestroy(ev);
  }
  // Frees still queued on streams are not trimmable until they complete,
  // hence the synchronize (what torch's cudaMallocAsync backend does too).
  void release_cache(int device) override {
    if (device < 0 || device >= kMaxDevices || state_[device].load() != kPooled) return;
    DeviceGuard guard(rt_, device);
    rt_->DeviceSynchronize();
    rt_->MemPoolTrimTo(pools_[device], 0);
    rt_->GetLastError();
  }
  bool reserved(int device, uint64_t* current, uint64_t* high) override {
    if (device < 0 || device >= kMaxDevices || state_[device].load() != kPooled) return false;
    uint64_t c = 0, h = 0;
    if (rt_->MemPoolGetAttribute(pools_[device], cuda::kMemPoolAttrReservedMemCurrent, &c) !=
            cuda::kSuccess ||
        rt_->MemPoolGetAttribute(pools_[device], cuda::kMemPoolAttrReservedMemHigh, &h) !=
            cuda::kSuccess) {
      rt_->GetLastError();
      return false;
    }
    *current = c;
    *high = h;
    return true;
  }
  void reset_reserved_peak(int device) override {
    if (device < 0 || device >= kMaxDevices || state_[device].load() != kPooled) return;
    uint64_t zero = 0;  // the runtime resets the high mark to the current value
    rt_->MemPoolSetAttribute(pools_[device], cuda::kMemPoolAttrReservedMemHigh, &zero);
    rt_->GetLastError();
  }

 private:
  enum : int { kUnknown = 0, kPooled = 1, kNoPool = 2 };

  // The device's default pool, set up on first use: with the default release
  // threshold (0) the pool returns freed memory to the driver at every
  // synchronize, and allocations go back to the driver every step.
  bool pool(int device) {
    int s = state_[device].load(std::memory_order_acquire);
    if (s != kUnknown) return s == kPooled;
    std::lock_guard<std::mutex> lock(init_mu_);
    s = state_[device].load();
    if (s != kUnknown) return s == kPooled;
    int supported = 0;
    cuda::MemPool p = nullptr;
    bool ok = rt_->DeviceGetAttribute(&supported, cuda::kDevAttrMemoryPoolsSupported, device) ==
                  cuda::kSuccess &&
              supported && rt_->DeviceGetDefaultMemPool(&p, device) == cuda::kSuccess;
    if (ok) {
      uint64_t threshold = UINT64_MAX;
      rt_->MemPoolSetAttribute(p, cuda::kMemPoolAttrReleaseThreshold, &threshold);
      pools_[device] = p;
    } else {
      std::fprintf(stderr,
                   "torchmem: device %d has no stream-ordered memory pools; "
                   "using cudaMalloc there\n", device);
    }
    rt_->GetLastError();
    state_[device].store(ok ? kPooled : kNoPool, std::memory_order_release);
    return ok;
  }

  std::mutex init_mu_;
  std::atomic<int> state_[kMaxDevices] = {};
  cuda::MemPool pools_[kMaxDevices] = {};
};

}  // namespace

Backend* make_host_backend() {
  // Immortal: blocks may come back during static destruction at exit.
  static HostBackend* backend = new HostBackend;
  return backend;
}

Backend* make_fake_backend() {
  // Immortal: blocks may come back during static destruction at exit.
  static FakeBackend* backend = new FakeBackend;
  return backend;
}

Backend* make_sync_backend(std::string* why) {
  const Runtime* rt = cuda::runtime();
  if (!rt) {
    *why = cuda::runtime_description();
    return nullptr;
  }
  // Immortal: blocks may come back during static destruction at exit.
  static SyncBackend* backend = new SyncBackend(rt);
  return backend;
}

Backend* make_async_backend(std::string* why) {
  const Runtime* rt = cuda::runtime();
  if (!rt || !rt->has_async) {
    *why = rt ? "libcudart has no cudaMallocAsync (CUDA < 11.2): " + rt->missing
              : cuda::runtime_description();
    return nullptr;
  }
  // Immortal: blocks may come back during static destruction at exit.
  static AsyncBackend* backend = new AsyncBackend(rt);
  return backend;
}

std::vector<std::string> fake_log() {
  FakeBackend* f = static_cast<FakeBackend*>(make_fake_backend());
  return f->log_copy();
}
void fake_clear_log() { static_cast<FakeBackend*>(make_fake_backend())->clear(); }
void fake_fail_next(int count) { static_cast<FakeBackend*>(make_fake_backend())->fail_next(count); }
void fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes) {
  static_cast<FakeBackend*>(make_fake_backend())->set_mem_info(free_bytes, total_bytes);
}

}  // namespace plugin
}  // namespace torchmem
