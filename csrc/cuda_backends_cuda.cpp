// The plugin's CUDA backends: async (cudaMallocAsync on the device's default
// pool; the default) and sync (cudaMalloc / cudaFree).
//
// Error handling: every call that fails clears its own error from the
// runtime's last-error slot (cuda::clear_own_error) and nothing else, so an
// error of torch's that torch has not checked yet is left for torch.
#include <atomic>
#include <cstdio>
#include <mutex>
#include <string>

#include "cuda_plugin.hpp"
#include "cuda_runtime.hpp"

namespace torchmem {
namespace plugin {
namespace {

using cuda::DeviceGuard;
using cuda::Runtime;

// Shared by the CUDA backends: error text, device memory, fences, the
// unifying streams, peer access.
class CudaBackendBase : public Backend {
 public:
  explicit CudaBackendBase(const Runtime* rt) : rt_(rt) {}
  bool mem_info(int device, uint64_t* free_bytes, uint64_t* total_bytes) override {
    DeviceGuard guard(rt_, device);
    size_t f = 0, t = 0;
    cuda::Error err = rt_->MemGetInfo(&f, &t);
    if (err != cuda::kSuccess) {
      cuda::clear_own_error(rt_, err);
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
  // An event recorded on `user` (which must be current on its own device,
  // hence the guard), waited for by `waiter` (any device).
  bool fence(int user_device, void* user, void* waiter) override {
    int device = user_device >= 0 ? user_device : stream_device(user);
    DeviceGuard guard(rt_, device);
    cuda::Event ev = nullptr;
    cuda::Error err = rt_->EventCreateWithFlags(&ev, cuda::kEventDisableTiming);
    if (err != cuda::kSuccess) return note(err, "cudaEventCreateWithFlags");
    err = rt_->EventRecord(ev, user);
    if (err == cuda::kSuccess) err = wait(ev, waiter);
    // Destroying a recorded event is safe: its resources go once it completes.
    rt_->EventDestroy(ev);
    return err == cuda::kSuccess || note(err, "cudaEventRecord/cudaStreamWaitEvent");
  }
  bool sync_stream(int device, void* stream) override {
    DeviceGuard guard(rt_, device >= 0 ? device : stream_device(stream));
    cuda::Error err = rt_->StreamSynchronize(stream);
    return err == cuda::kSuccess || note(err, "cudaStreamSynchronize");
  }
  bool enable_peer_access(int device, int peer, std::string* why) override {
    if (!rt_->DeviceEnablePeerAccess) {
      *why = "libcudart has no cudaDeviceEnablePeerAccess";
      return false;
    }
    DeviceGuard guard(rt_, device);
    cuda::Error err = rt_->DeviceEnablePeerAccess(peer, 0);
    if (err == cuda::kErrorPeerAccessAlreadyEnabled) {
      cuda::clear_own_error(rt_, err);
    } else if (err != cuda::kSuccess) {
      note(err, "cudaDeviceEnablePeerAccess");
      *why = last_error();
      return false;
    }
    return pool_access(device, peer, why);
  }

 protected:
  // For backends with pools: grants `device` access to `peer`'s pool.
  virtual bool pool_access(int device, int peer, std::string* why) {
    (void)device; (void)peer; (void)why;
    return true;
  }
  virtual cuda::Error wait(cuda::Event ev, void* waiter) {
    return rt_->StreamWaitEvent(waiter, ev, 0);
  }
  // The device of a stream torch's C-function interface gave without one;
  // -1 (the current device stays) when the runtime cannot say.
  int stream_device(void* stream) {
    int device = -1;
    if (!rt_->StreamGetDevice) return -1;
    cuda::Error err = rt_->StreamGetDevice(stream, &device);
    if (err != cuda::kSuccess) {
      cuda::clear_own_error(rt_, err);
      return -1;
    }
    return device;
  }
  // Keeps the error text for messages and clears our own error; false.
  bool note(cuda::Error err, const char* what) {
    cuda::clear_own_error(rt_, err);
    std::lock_guard<std::mutex> lock(err_mu_);
    last_error_ = std::string(what) + ": " + rt_->GetErrorString(err);
    return false;
  }
  AllocStatus failed(cuda::Error err, const char* what) {
    note(err, what);
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
  // cudaMalloc and cudaFree synchronise the device: forbidden while a stream
  // is being captured.
  bool supports_capture(std::string* why) const override {
    *why = "torchmem's 'sync' CUDA backend (cudaMalloc) cannot allocate while a CUDA graph is "
           "being captured. Use the default 'async' backend "
           "(torchmem.cuda.set_backend('async') before torchmem.enable()), or "
           "torchmem.enable(gpu_source='tracker'), which keeps torch's caching allocator "
           "and its graph pools.";
    return false;
  }
  void release_cache(int) override {}

 protected:
  // cudaFree is not stream ordered, so the host waits for the other
  // stream's work before the block goes back.
  cuda::Error wait(cuda::Event ev, void*) override { return rt_->EventSynchronize(ev); }
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
    bool pooled = pooled_device(device);
    cuda::Error err = pooled ? rt_->FreeAsync(ptr, stream) : rt_->Free(ptr);
    if (err != cuda::kSuccess) failed(err, pooled ? "cudaFreeAsync" : "cudaFree");
  }
  void* unifying_stream(int device) override {
    if (device < 0 || device >= kMaxDevices || !rt_->StreamCreateWithFlags) return nullptr;
    void* s = unifying_[device].load(std::memory_order_acquire);
    if (s) return s;
    std::lock_guard<std::mutex> lock(init_mu_);
    s = unifying_[device].load();
    if (s) return s;
    DeviceGuard guard(rt_, device);
    cuda::Stream created = nullptr;
    cuda::Error err = rt_->StreamCreateWithFlags(&created, cuda::kStreamNonBlocking);
    if (err != cuda::kSuccess) {
      note(err, "cudaStreamCreateWithFlags");
      return nullptr;  // the plugin then fences into the block's own stream
    }
    unifying_[device].store(created, std::memory_order_release);
    return created;
  }
  // Frees still queued on streams are not trimmable until they complete,
  // hence the synchronize (what torch's cudaMallocAsync backend does too).
  void release_cache(int device) override {
    if (!pooled_device(device)) return;
    DeviceGuard guard(rt_, device);
    cuda::Error err = rt_->DeviceSynchronize();
    if (err == cuda::kSuccess) err = rt_->MemPoolTrimTo(pools_[device], 0);
    cuda::clear_own_error(rt_, err);
  }
  bool largest_free(int device, uint64_t* bytes) override {
    uint64_t free_b = 0, total_b = 0;
    if (!mem_info(device, &free_b, &total_b)) return false;
    // The pool hands out what it holds unused as well as what the device
    // has free (torch's cudaMallocAsync backend probes the same sum).
    uint64_t reserved_b = 0, used_b = 0;
    if (pooled_device(device) &&
        attribute(device, cuda::kMemPoolAttrReservedMemCurrent, &reserved_b) &&
        attribute(device, cuda::kMemPoolAttrUsedMemCurrent, &used_b) && reserved_b > used_b) {
      free_b += reserved_b - used_b;
    }
    *bytes = free_b;
    return true;
  }
  bool reserved(int device, uint64_t* current, uint64_t* high) override {
    if (!pooled_device(device)) return false;
    return attribute(device, cuda::kMemPoolAttrReservedMemCurrent, current) &&
           attribute(device, cuda::kMemPoolAttrReservedMemHigh, high);
  }
  void reset_reserved_peak(int device) override {
    if (!pooled_device(device)) return;
    uint64_t zero = 0;  // the runtime resets the high mark to the current value
    cuda::Error err =
        rt_->MemPoolSetAttribute(pools_[device], cuda::kMemPoolAttrReservedMemHigh, &zero);
    cuda::clear_own_error(rt_, err);
  }

 protected:
  // cudaMallocAsync pools ignore cudaDeviceEnablePeerAccess: each pool says
  // which devices may access it (torch's cudaMallocAsync backend does this).
  bool pool_access(int device, int peer, std::string* why) override {
    if (peer < 0 || peer >= kMaxDevices) return true;
    if (!pool(peer)) return true;  // plain cudaMalloc memory: device access suffices
    if (!rt_->MemPoolSetAccess) {
      *why = "libcudart has no cudaMemPoolSetAccess";
      return false;
    }
    cuda::MemAccessDesc desc{cuda::kMemLocationTypeDevice, device,
                             cuda::kMemAccessFlagsProtReadWrite};
    cuda::Error err = rt_->MemPoolSetAccess(pools_[peer], &desc, 1);
    if (err == cuda::kSuccess) return true;
    note(err, "cudaMemPoolSetAccess");
    *why = last_error();
    return false;
  }

 private:
  enum : int { kUnknown = 0, kPooled = 1, kNoPool = 2 };

  bool pooled_device(int device) const {
    return device >= 0 && device < kMaxDevices && state_[device].load() == kPooled;
  }
  bool attribute(int device, int attr, uint64_t* value) {
    cuda::Error err = rt_->MemPoolGetAttribute(pools_[device], attr, value);
    if (err == cuda::kSuccess) return true;
    cuda::clear_own_error(rt_, err);
    return false;
  }

  // The device's default pool, set up on first use (with `device` current):
  // with the default release threshold (0) the pool returns freed memory to
  // the driver at every synchronize, and allocations go back to the driver
  // every step.
  bool pool(int device) {
    int s = state_[device].load(std::memory_order_acquire);
    if (s != kUnknown) return s == kPooled;
    std::lock_guard<std::mutex> lock(init_mu_);
    s = state_[device].load();
    if (s != kUnknown) return s == kPooled;
    int supported = 0;
    cuda::MemPool p = nullptr;
    cuda::Error err =
        rt_->DeviceGetAttribute(&supported, cuda::kDevAttrMemoryPoolsSupported, device);
    if (err == cuda::kSuccess && supported) err = rt_->DeviceGetDefaultMemPool(&p, device);
    bool ok = err == cuda::kSuccess && supported && p;
    if (ok) {
      uint64_t threshold = UINT64_MAX;
      err = rt_->MemPoolSetAttribute(p, cuda::kMemPoolAttrReleaseThreshold, &threshold);
      pools_[device] = p;
    } else {
      std::fprintf(stderr,
                   "torchmem: device %d has no stream-ordered memory pools; "
                   "using cudaMalloc there\n", device);
    }
    cuda::clear_own_error(rt_, err);
    state_[device].store(ok ? kPooled : kNoPool, std::memory_order_release);
    return ok;
  }

  std::mutex init_mu_;
  std::atomic<int> state_[kMaxDevices] = {};
  cuda::MemPool pools_[kMaxDevices] = {};
  std::atomic<void*> unifying_[kMaxDevices] = {};
};

}  // namespace

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

}  // namespace plugin
}  // namespace torchmem
