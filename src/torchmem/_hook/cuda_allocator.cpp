// torchmem's CUDA allocator as a subclass of torch's CUDAAllocator, compiled
// against the installed torch at first use (torchmem/sources/cuda_hook.py).
// Over 400 lines on purpose: it is one class, every virtual of torch's
// CUDAAllocator overridden in it, and its registration.
//
// Why a class and not torch's C-function CUDAPluggableAllocator: only a
// CUDAAllocator can throw c10::OutOfMemoryError (what torch.OutOfMemoryError
// is, and what cuDNN's workspace retry catches), answer cacheInfo (cuDNN's
// benchmark mode sizes workspaces with it), getDeviceStats (every C++ and
// Python caller of torch's memory statistics, torch.accelerator included),
// snapshot (torch.cuda.memory._snapshot, memory_viz), the graph-pool hooks
// (CUDA graph capture), peer access and the OOM observers.
//
// The class holds no allocator logic: every call goes to torchmem._native
// through the table handed over by torchmem_cuda_hook_attach (backends,
// bookkeeping, capture deferral, record_stream fencing, counters), where the
// CPU tests reach it through the fake and host backends. What is here is the
// translation to torch's types and exceptions.
#include <c10/core/Allocator.h>
#include <c10/core/Device.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/ApproximateClock.h>
#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "cuda_hook_common.h"

namespace torchmem_hook {
namespace {
std::atomic<const TorchmemCudaHookApi*> g_api{nullptr};
}  // namespace

const TorchmemCudaHookApi* api() { return g_api.load(std::memory_order_acquire); }

std::string last_message() {
  const TorchmemCudaHookApi* a = api();
  if (!a) return "torchmem's CUDA library is not attached to torchmem._native";
  size_t n = a->last_message(nullptr, 0);
  std::string text(n + 1, '\0');
  a->last_message(&text[0], text.size());
  text.resize(n);
  return text;
}

size_t copy_out(const std::string& text, char* buf, size_t len) {
  if (buf && len) {
    size_t n = std::min(len - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return text.size();
}

}  // namespace torchmem_hook

extern "C" __attribute__((visibility("default"))) int torchmem_cuda_hook_attach(
    const void* table) {
  auto* t = static_cast<const TorchmemCudaHookApi*>(table);
  if (!t || t->version != TORCHMEM_CUDA_HOOK_API_VERSION || t->size != sizeof(TorchmemCudaHookApi))
    return -1;
  torchmem_hook::g_api.store(t, std::memory_order_release);
  return 0;
}

// 1 when this build has the allocator class (torch >= 2.11).
extern "C" __attribute__((visibility("default"))) int torchmem_cuda_allocator_supported(void) {
  return TORCHMEM_HAVE_ALLOCATOR_CLASS ? 1 : 0;
}

#if TORCHMEM_HAVE_ALLOCATOR_CLASS

namespace torchmem_hook {
namespace {

namespace CCA = c10::cuda::CUDACachingAllocator;
using c10::CachingDeviceAllocator::DeviceStats;
using c10::CachingDeviceAllocator::Stat;
using c10::CachingDeviceAllocator::StatType;

constexpr size_t kAggregate = static_cast<size_t>(StatType::AGGREGATE);

void set_stat(Stat& s, uint64_t current, uint64_t peak, uint64_t allocated, uint64_t freed) {
  s.current = static_cast<int64_t>(current);
  s.peak = static_cast<int64_t>(peak);
  s.allocated = static_cast<int64_t>(allocated);
  s.freed = static_cast<int64_t>(freed);
}

void raw_delete_fn(void* ptr);

// The first parameter type of a member function (for a virtual whose
// parameter type only some torch versions declare).
template <typename T>
struct first_arg;
template <typename C, typename R, typename A>
struct first_arg<R (C::*)(A)> {
  using type = A;
};
template <typename A, typename = void>
struct has_oom_rejection : std::false_type {};
template <typename A>
struct has_oom_rejection<A, std::void_t<decltype(&A::attachOomRejectionObserver)>>
    : std::true_type {};

// torch >= 2.13 adds a pure virtual attachOomRejectionObserver: the layer
// implements it only where it exists. torchmem rejects nothing preemptively,
// so the observers are kept and never called.
template <typename Base, bool = has_oom_rejection<Base>::value>
struct OomRejectionLayer : Base {};
template <typename Base>
struct OomRejectionLayer<Base, true> : Base {
  using Observer = typename first_arg<decltype(&Base::attachOomRejectionObserver)>::type;
  void attachOomRejectionObserver(Observer observer) override {
    std::lock_guard<std::mutex> lock(rejection_mu_);
    rejection_observers_.push_back(std::move(observer));
  }
  std::mutex rejection_mu_;
  std::vector<std::decay_t<Observer>> rejection_observers_;
};

class TorchmemCudaAllocator final : public OomRejectionLayer<CCA::CUDAAllocator> {
 public:
  // -- allocation ----------------------------------------------------------
  c10::DataPtr allocate(size_t size) override {
    c10::DeviceIndex device = 0;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    void* p = alloc_on(size, device, c10::cuda::getCurrentCUDAStream(device).stream());
    return {p, p, &raw_delete_fn, c10::Device(c10::DeviceType::CUDA, device)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &raw_delete_fn; }
  void* raw_alloc(size_t nbytes) override {
    c10::DeviceIndex device = 0;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    return alloc_on(nbytes, device, c10::cuda::getCurrentCUDAStream(device).stream());
  }
  void* raw_alloc_with_stream(size_t nbytes, cudaStream_t stream) override {
    c10::DeviceIndex device = 0;
    C10_CUDA_CHECK(c10::cuda::GetDevice(&device));
    return alloc_on(nbytes, device, stream);
  }
  void raw_delete(void* ptr) override { free_block(ptr); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    C10_CUDA_CHECK(cudaMemcpy(dest, src, count, cudaMemcpyDeviceToDevice));
  }

  void free_block(void* ptr) {
    if (!ptr) return;
    api()->free(ptr);
    if (has_trackers_.load(std::memory_order_acquire)) notify_free(ptr);
  }

  // -- lifecycle -----------------------------------------------------------
  void init(int device_count) override {
    api()->init(device_count);
    device_count_.store(device_count);
    initialized_.store(true);
  }
  bool initialized() override { return initialized_.load(); }
  void emptyCache(c10::MempoolId_t /*mempool_id*/) override { api()->empty_cache(); }
  void enable(bool /*value*/) override {}
  bool isEnabled() const override { return true; }
  std::string name() override { return "torchmem"; }

  // -- limits and queries --------------------------------------------------
  double getMemoryFraction(c10::DeviceIndex device) override {
    return api()->memory_fraction(device);
  }
  void setMemoryFraction(double fraction, c10::DeviceIndex device) override {
    TORCH_CHECK(fraction >= 0.0 && fraction <= 1.0, "invalid fraction: ", fraction,
                ". Please set within [0, 1].");
    api()->set_memory_fraction(fraction, device);
  }
  void cacheInfo(c10::DeviceIndex device, size_t* largestBlock) override {
    *largestBlock = static_cast<size_t>(api()->largest_free_block(device));
  }
  void* getBaseAllocation(void* ptr, size_t* size) override {
    return api()->base_allocation(ptr, size);
  }
  std::vector<CCA::StreamSegmentSize> getExpandableSegmentSizes(c10::DeviceIndex) override {
    return {};
  }
  void recordStream(const c10::DataPtr& ptr, c10::cuda::CUDAStream stream) override {
    if (!ptr.get()) return;  // empty tensors have no block
    api()->record_stream(ptr.get(), stream.stream(), stream.device_index());
  }

  // -- statistics ------------------------------------------------------------
  DeviceStats getDeviceStats(c10::DeviceIndex device) override {
    uint64_t v[16] = {};
    api()->stats(device, v, 16);
    // v: current peak allocated freed alloc_count free_count oom retry
    //    reserved reserved_peak live_blocks unknown peak_live_blocks ...
    DeviceStats s;
    for (auto* stat : {&s.allocated_bytes, &s.active_bytes, &s.requested_bytes})
      set_stat((*stat)[kAggregate], v[0], v[1], v[2], v[3]);
    for (auto* stat : {&s.allocation, &s.active})
      set_stat((*stat)[kAggregate], v[10], v[12], v[4], v[5]);
    set_stat(s.reserved_bytes[kAggregate], v[8], v[9], 0, 0);
    s.num_ooms = static_cast<int64_t>(v[6]);
    s.num_alloc_retries = static_cast<int64_t>(v[7]);
    s.num_device_alloc = static_cast<int64_t>(v[4]);
    s.num_device_free = static_cast<int64_t>(v[5]);
    s.max_split_size = -1;  // no splitting: torch reports "unlimited" as -1 too
    return s;
  }
  void resetAccumulatedStats(c10::DeviceIndex device) override {
    api()->reset_accumulated(device);
  }
  void resetPeakStats(c10::DeviceIndex device) override { api()->reset_peak(device); }

  CCA::SnapshotInfo snapshot(c10::MempoolId_t mempool_id, bool /*include_traces*/) override {
    std::vector<TorchmemBlock> blocks(api()->live_blocks(nullptr, 0) + 64);
    blocks.resize(std::min(blocks.size(), api()->live_blocks(blocks.data(), blocks.size())));
    const bool graph_pool = mempool_id.first != 0 || mempool_id.second != 0;
    CCA::SnapshotInfo info{};  // value-initialised: its config fields are plain scalars
    for (const TorchmemBlock& b : blocks) {
      if (graph_pool && !(b.flags & TORCHMEM_ALLOC_CAPTURED)) continue;
      const bool freed = (b.flags & 2u) != 0;  // freed during a capture, not yet released
      c10::CachingDeviceAllocator::SegmentInfo seg;
      seg.device = static_cast<c10::DeviceIndex>(b.device);
      seg.address = static_cast<size_t>(b.address);
      seg.total_size = seg.requested_size = seg.active_size = static_cast<size_t>(b.size);
      seg.allocated_size = freed ? 0 : static_cast<size_t>(b.size);
      seg.stream = reinterpret_cast<void*>(b.stream);
      seg.is_large = b.size > (1u << 20);
      seg.is_expandable = false;
      c10::CachingDeviceAllocator::BlockInfo block;
      block.size = block.requested_size = static_cast<size_t>(b.size);
      block.allocated = !freed;
      block.active = true;
      seg.blocks.push_back(block);
      info.segments.push_back(std::move(seg));
    }
    info.device_traces.resize(std::max(0, device_count_.load()));
    info.config_metadata.last_allocator_settings =
        std::string("torchmem:") + api()->backend_name();
    return info;
  }

  // -- CUDA graphs -------------------------------------------------------------
  void beginAllocateToPool(c10::DeviceIndex device, c10::MempoolId_t mempool_id,
                           std::function<bool(cudaStream_t)> filter) override {
    TORCH_CHECK(api()->capture_begin(device) == 0, last_message());
    std::lock_guard<std::mutex> lock(capture_mu_);
    captures_.push_back(Capture{device, mempool_id, std::move(filter)});
    capturing_.store(static_cast<int>(captures_.size()), std::memory_order_release);
  }
  void endAllocateToPool(c10::DeviceIndex device, c10::MempoolId_t mempool_id) override {
    {
      std::lock_guard<std::mutex> lock(capture_mu_);
      auto it = std::find_if(captures_.begin(), captures_.end(), [&](const Capture& c) {
        return c.device == device && c.pool == mempool_id;
      });
      if (it == captures_.end()) return;
      captures_.erase(it);
      capturing_.store(static_cast<int>(captures_.size()), std::memory_order_release);
    }
    api()->capture_end(device, c10::cuda::getCurrentCUDAStream(device).stream());
  }
  // Graph memory is made by cudaMallocAsync during capture and owned by the
  // graph; nothing of the plugin's to release.
  void releasePool(c10::DeviceIndex, c10::MempoolId_t) override {}
  // torch.cuda.MemPool (and use_mem_pool) route allocations to a private
  // pool, or to another allocator: the plugin has neither, and accepting the
  // pool would silently change where those allocations go.
  void createOrIncrefPool(c10::DeviceIndex, c10::MempoolId_t,
                          std::shared_ptr<CCA::CUDAAllocator>) override {
    TORCH_CHECK(false, kMemPool);
  }

  // -- observers -----------------------------------------------------------------
  void recordHistory(bool enabled, CCA::CreateContextFn, size_t, CCA::RecordContext, bool,
                     const std::vector<std::string>&) override {
    if (enabled) {
      TORCH_WARN_ONCE(
          "torch.cuda.memory._record_memory_history has no effect while torchmem's CUDA "
          "allocator is installed: torchmem records every allocation itself "
          "(torchmem.export.memory_viz writes a snapshot memory_viz opens).");
    }
  }
  bool isHistoryEnabled() override { return false; }
  void attachOutOfMemoryObserver(CCA::OutOfMemoryObserver observer) override {
    std::lock_guard<std::mutex> lock(observer_mu_);
    oom_observers_.push_back(std::move(observer));
  }
  void attachAllocatorTraceTracker(CCA::AllocatorTraceTracker tracker) override {
    std::lock_guard<std::mutex> lock(observer_mu_);
    trackers_.push_back(std::move(tracker));
    has_trackers_.store(true, std::memory_order_release);
  }

  // -- devices -------------------------------------------------------------------
  void enablePeerAccess(c10::DeviceIndex dev, c10::DeviceIndex dev_to_access) override {
    TORCH_CHECK(api()->enable_peer_access(dev, dev_to_access) == 0, last_message());
  }
  cudaError_t memcpyAsync(void* dst, int dstDevice, const void* src, int srcDevice, size_t count,
                          cudaStream_t stream, bool p2p_enabled) override {
    // Pool memory of another device is reachable by a plain copy only once
    // peer access is on; otherwise the peer copy works either way.
    if (p2p_enabled || dstDevice == srcDevice) {
      return cudaMemcpyAsync(dst, src, count, cudaMemcpyDeviceToDevice, stream);
    }
    return cudaMemcpyPeerAsync(dst, dstDevice, src, srcDevice, count, stream);
  }

  // -- not supported: each says what to use instead ----------------------------------
  CCA::ShareableHandle shareIpcHandle(void*) override {
    TORCH_CHECK(false, kIpc);
  }
  std::shared_ptr<void> getIpcDevPtr(std::string) override { TORCH_CHECK(false, kIpc); }
  std::shared_ptr<CCA::AllocatorState> getCheckpointState(c10::DeviceIndex,
                                                          c10::MempoolId_t) override {
    TORCH_CHECK(false, kCheckpoint);
  }
  CCA::CheckpointDelta setCheckpointPoolState(c10::DeviceIndex,
                                              std::shared_ptr<CCA::AllocatorState>) override {
    TORCH_CHECK(false, kCheckpoint);
  }

 private:
  static constexpr const char* kIpc =
      "torchmem's CUDA allocator cannot share CUDA tensors between processes "
      "(torch.multiprocessing CUDA IPC). Use torchmem.enable(gpu_source='tracker'), which "
      "keeps torch's caching allocator.";
  static constexpr const char* kMemPool =
      "torchmem's CUDA allocator has no private memory pools (torch.cuda.MemPool, "
      "use_mem_pool). Use torchmem.enable(gpu_source='tracker'), which keeps torch's "
      "caching allocator.";
  static constexpr const char* kCheckpoint =
      "torchmem's CUDA allocator has no caching-allocator checkpoints (torch.compile's "
      "CUDA graph trees use them). Use torchmem.enable(gpu_source='tracker'), which keeps "
      "torch's caching allocator.";

  struct Capture {
    c10::DeviceIndex device;
    c10::MempoolId_t pool;
    std::function<bool(cudaStream_t)> filter;
  };

  // Whether an allocation on `stream` belongs to a graph being captured.
  bool captured(c10::DeviceIndex device, cudaStream_t stream) {
    if (capturing_.load(std::memory_order_acquire) == 0) return false;
    std::lock_guard<std::mutex> lock(capture_mu_);
    for (const Capture& c : captures_)
      if (c.device == device && c.filter && c.filter(stream)) return true;
    return false;
  }

  void* alloc_on(size_t size, c10::DeviceIndex device, cudaStream_t stream) {
    if (size == 0) return nullptr;
    const unsigned flags = captured(device, stream) ? TORCHMEM_ALLOC_CAPTURED : 0u;
    void* p = nullptr;
    const int status = api()->alloc(&p, size, device, stream, flags);
    if (status == TORCHMEM_ALLOC_OK) {
      if (has_trackers_.load(std::memory_order_acquire)) notify_alloc(p, size, device, stream);
      return p;
    }
    std::string msg = last_message();
    if (status == TORCHMEM_ALLOC_OOM) {
      uint64_t free_b = 0, total_b = 0, live[1] = {0};
      api()->mem_info(device, &free_b, &total_b);
      api()->stats(device, live, 1);
      std::vector<CCA::OutOfMemoryObserver> observers;
      {
        std::lock_guard<std::mutex> lock(observer_mu_);
        observers = oom_observers_;
      }
      for (const auto& obs : observers) {
        obs(device, static_cast<size_t>(live[0]), static_cast<size_t>(total_b),
            static_cast<size_t>(free_b));
      }
      TORCH_CHECK_WITH(OutOfMemoryError, false, msg);
    }
    TORCH_CHECK(false, msg);
  }

  // Trace trackers (NCCL's buffer registration, for one) see every block as
  // its own segment, which is what it is under the plugin.
  void notify(c10::CachingDeviceAllocator::TraceEntry::Action action, c10::DeviceIndex device,
              void* ptr, size_t size, void* stream) {
    std::vector<CCA::AllocatorTraceTracker> trackers;
    {
      std::lock_guard<std::mutex> lock(observer_mu_);
      trackers = trackers_;
    }
    c10::CachingDeviceAllocator::TraceEntry te(action, device, reinterpret_cast<size_t>(ptr),
                                               size, stream, c10::MempoolId_t{0, 0},
                                               c10::getApproximateTime());
    for (const auto& t : trackers) t(te);
  }
  void notify_alloc(void* ptr, size_t size, c10::DeviceIndex device, cudaStream_t stream) {
    using A = c10::CachingDeviceAllocator::TraceEntry::Action;
    {
      std::lock_guard<std::mutex> lock(observer_mu_);
      tracked_[ptr] = Tracked{ptr, size, stream, device};
    }
    notify(A::SEGMENT_ALLOC, device, ptr, size, stream);
    notify(A::ALLOC, device, ptr, size, stream);
  }
  void notify_free(void* ptr) {
    using A = c10::CachingDeviceAllocator::TraceEntry::Action;
    Tracked t{ptr, 0, nullptr, 0};
    {
      // Blocks made before the first tracker was attached are not known:
      // they are reported with size 0 on device 0.
      std::lock_guard<std::mutex> lock(observer_mu_);
      auto it = tracked_.find(ptr);
      if (it != tracked_.end()) {
        t = it->second;
        tracked_.erase(it);
      }
    }
    notify(A::FREE_COMPLETED, t.device, ptr, t.size, t.stream);
    notify(A::SEGMENT_FREE, t.device, ptr, t.size, t.stream);
  }
  struct Tracked {
    void* ptr;
    size_t size;
    void* stream;
    c10::DeviceIndex device;
  };
  // Blocks trackers were told of (trackers are rare: NCCL buffer registration).
  std::unordered_map<void*, Tracked> tracked_;

  std::atomic<bool> initialized_{false};
  std::atomic<int> device_count_{0};
  std::mutex capture_mu_;
  std::vector<Capture> captures_;
  std::atomic<int> capturing_{0};
  std::mutex observer_mu_;
  std::vector<CCA::OutOfMemoryObserver> oom_observers_;
  std::vector<CCA::AllocatorTraceTracker> trackers_;
  std::atomic<bool> has_trackers_{false};
};

// Never destroyed: torch frees its last blocks during static destruction.
TorchmemCudaAllocator& instance() {
  static auto* a = new TorchmemCudaAllocator();
  return *a;
}

void raw_delete_fn(void* ptr) { instance().free_block(ptr); }

}  // namespace
}  // namespace torchmem_hook

// Makes the class torch's CUDA allocator, for torch.cuda (the allocator
// torch's CUDA code calls) and for c10::GetAllocator(kCUDA) (storages made by
// device type, torch.accelerator's memory functions). Returns 0; -1 when
// torch's allocator is already initialised (CUDA in use), -2 when the table is
// not attached, -3 when another allocator of higher priority holds kCUDA.
extern "C" __attribute__((visibility("default"))) int torchmem_cuda_allocator_install(
    char* err, size_t len) {
  using torchmem_hook::instance;
  namespace CCA = c10::cuda::CUDACachingAllocator;
  if (!torchmem_hook::api()) {
    torchmem_hook::copy_out("torchmem's CUDA library is not attached", err, len);
    return -2;
  }
  auto& mine = instance();
  CCA::CUDAAllocator* current = CCA::allocator.load();
  if (current != &mine) {
    if (current && current->initialized()) {
      torchmem_hook::copy_out("torch's CUDA allocator is already initialised (CUDA is in use)",
                              err, len);
      return -1;
    }
    CCA::allocator.store(&mine);
  }
  // SetAllocator replaces only at or above the current priority, which it
  // does not tell: climb until ours is the one in place.
  for (int p = 0; p <= 255 && c10::GetAllocator(c10::DeviceType::CUDA) != &mine; ++p) {
    c10::SetAllocator(c10::DeviceType::CUDA, &mine, static_cast<uint8_t>(p));
  }
  if (c10::GetAllocator(c10::DeviceType::CUDA) != &mine) {
    torchmem_hook::copy_out("another allocator holds c10::GetAllocator(kCUDA)", err, len);
    return -3;
  }
  return 0;
}

// 1 while the class is torch's CUDA allocator.
extern "C" __attribute__((visibility("default"))) int torchmem_cuda_allocator_active(void) {
  return c10::cuda::CUDACachingAllocator::allocator.load() == &torchmem_hook::instance();
}

#else  // torch < 2.11: the trace tracker only

extern "C" __attribute__((visibility("default"))) int torchmem_cuda_allocator_install(
    char* err, size_t len) {
  torchmem_hook::copy_out("torchmem's CUDA allocator class needs torch >= 2.11", err, len);
  return -4;
}

extern "C" __attribute__((visibility("default"))) int torchmem_cuda_allocator_active(void) {
  return 0;
}

#endif
