// torchmem's wrapper of torch's CUDA host (pinned memory) allocator, compiled
// against the installed torch at first use (torchmem/sources/pinned.py).
//
// torch >= 2.8 keeps one at::HostAllocator per device type, set with
// at::setHostAllocator and read with at::getHostAllocator: pin_memory(),
// torch.empty(..., pin_memory=True) and DataLoader's pin-memory thread all
// allocate through at::getHostAllocator(kCUDA). The wrapper takes its place,
// calls torch's allocator, reports each block handed out and each block
// given back (the user-visible lifetime; torch's allocator caches the memory
// behind it), and forwards everything else. Older torch has no setter: there
// the module builds but install() says so.
//
// Blocks keep their data pointer; their context is the wrapper's, holding
// torch's DataPtr. torch passes a block's context back in record_event (the
// non_blocking copy path): the wrapper hands torch its own context there.
//
// Only needs c10 and torch_cpu (no CUDA headers), so the CPU tests build it
// too and drive it with a fake inner allocator (the torchmem_pinned_test_*
// functions below).
#include <torch/version.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_set>

#include "cuda_hook_api.h"

#define TORCHMEM_PINNED_SUPPORTED \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
#define TORCHMEM_PINNED_POOLS \
  (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 11))

#define TORCHMEM_API extern "C" __attribute__((visibility("default")))

namespace {
std::atomic<const TorchmemCudaHookApi*> g_api{nullptr};
}  // namespace

TORCHMEM_API int torchmem_pinned_attach(const void* table) {
  auto* t = static_cast<const TorchmemCudaHookApi*>(table);
  if (!t || t->version != TORCHMEM_CUDA_HOOK_API_VERSION || t->size != sizeof(TorchmemCudaHookApi))
    return -1;
  g_api.store(t, std::memory_order_release);
  return 0;
}

#if TORCHMEM_PINNED_SUPPORTED

#include <ATen/core/CachingHostAllocator.h>

namespace {

std::atomic<bool> g_recording{false};

// A block the wrapper recorded: torch's own DataPtr inside.
struct PinnedContext {
  c10::DataPtr inner;
};

class TrackingHostAllocator final : public at::HostAllocator {
 public:
  void wrap(at::HostAllocator* inner) { inner_ = inner; }
  at::HostAllocator* inner() const { return inner_; }

  at::DataPtr allocate(size_t n) override {
    at::DataPtr block = inner_->allocate(n);
    void* data = block.get();
    const TorchmemCudaHookApi* api = g_api.load(std::memory_order_acquire);
    if (!g_recording.load(std::memory_order_acquire) || !api || !data ||
        !api->pinned_alloc(data, n)) {
      return block;  // untracked: left as it was
    }
    const c10::Device device = block.device();
    auto* ctx = new PinnedContext{std::move(block)};
    {
      std::lock_guard<std::mutex> lock(mu_);
      contexts_.insert(ctx);
    }
    return at::DataPtr(data, ctx, &delete_pinned, device);
  }

  bool record_event(void* ptr, void* ctx, c10::Stream stream) override {
    return inner_->record_event(ptr, unwrap(ctx), stream);
  }
  void empty_cache() override { inner_->empty_cache(); }
  at::HostStats get_stats() override { return inner_->get_stats(); }
  void reset_accumulated_stats() override { inner_->reset_accumulated_stats(); }
  void reset_peak_stats() override { inner_->reset_peak_stats(); }
#if TORCHMEM_PINNED_POOLS
  void begin_allocate_to_pool(c10::MempoolId_t pool_id,
                              std::function<bool(c10::Stream)> filter) override {
    inner_->begin_allocate_to_pool(pool_id, std::move(filter));
  }
  void end_allocate_to_pool(c10::MempoolId_t pool_id) override {
    inner_->end_allocate_to_pool(pool_id);
  }
  void release_pool(c10::MempoolId_t pool_id) override { inner_->release_pool(pool_id); }
#endif
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner_->copy_data(dest, src, count);
  }

  static void delete_pinned(void* raw);

 private:
  void* unwrap(void* ctx) {
    std::lock_guard<std::mutex> lock(mu_);
    if (contexts_.count(static_cast<PinnedContext*>(ctx)))
      return static_cast<PinnedContext*>(ctx)->inner.get_context();
    return ctx;  // a block from before the wrapper, or not recorded
  }
  friend void forget(PinnedContext* ctx);

  at::HostAllocator* inner_ = nullptr;
  std::mutex mu_;
  std::unordered_set<PinnedContext*> contexts_;
};

// Never destroyed: blocks it handed out may be freed during teardown.
TrackingHostAllocator& tracker() {
  static auto* t = new TrackingHostAllocator();
  return *t;
}

void forget(PinnedContext* ctx) {
  TrackingHostAllocator& t = tracker();
  std::lock_guard<std::mutex> lock(t.mu_);
  t.contexts_.erase(ctx);
}

// The free is reported before torch's block goes back: the address cannot be
// handed out again before its free is in the log.
void TrackingHostAllocator::delete_pinned(void* raw) {
  auto* ctx = static_cast<PinnedContext*>(raw);
  forget(ctx);
  if (const TorchmemCudaHookApi* api = g_api.load(std::memory_order_acquire))
    api->pinned_free(ctx->inner.get());
  delete ctx;  // runs torch's deleter
}

std::mutex g_install_mu;
uint8_t g_priority = 0;

// -- a fake inner allocator for the CPU tests --------------------------------
struct FakeBlock {
  void* data;
};
std::mutex g_fake_mu;
std::unordered_set<FakeBlock*>& fake_blocks() {
  static auto* s = new std::unordered_set<FakeBlock*>();
  return *s;
}
void fake_delete(void* raw) {
  auto* b = static_cast<FakeBlock*>(raw);
  {
    std::lock_guard<std::mutex> lock(g_fake_mu);
    fake_blocks().erase(b);
  }
  std::free(b->data);
  delete b;
}
class FakeHostAllocator final : public at::HostAllocator {
 public:
  at::DataPtr allocate(size_t n) override {
    auto* b = new FakeBlock{std::malloc(n ? n : 1)};
    std::lock_guard<std::mutex> lock(g_fake_mu);
    fake_blocks().insert(b);
    return at::DataPtr(b->data, b, &fake_delete, c10::Device(c10::DeviceType::CPU));
  }
  // True only for a context this allocator made: what torch's allocator
  // needs to find its block.
  bool record_event(void*, void* ctx, c10::Stream) override {
    std::lock_guard<std::mutex> lock(g_fake_mu);
    return fake_blocks().count(static_cast<FakeBlock*>(ctx)) != 0;
  }
  void empty_cache() override {}
  at::HostStats get_stats() override { return {}; }
  void reset_accumulated_stats() override {}
  void reset_peak_stats() override {}
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

}  // namespace

// Installs the wrapper (or resumes recording). 0; -1 when no CUDA host
// allocator is registered (a CPU-only torch), -2 when another allocator
// replaced ours since the last install, -3 when one of higher priority is set.
TORCHMEM_API int torchmem_pinned_install(void) {
  std::lock_guard<std::mutex> lock(g_install_mu);
  TrackingHostAllocator& t = tracker();
  at::HostAllocator* current = at::getHostAllocator(at::kCUDA);
  if (current != &t) {
    if (!current) return -1;
    if (t.inner() && current != t.inner()) return -2;
    if (!t.inner()) t.wrap(current);  // set once: freed blocks read it unlocked
    for (int p = 0; p <= 255 && at::getHostAllocator(at::kCUDA) != &t; ++p) {
      at::setHostAllocator(at::kCUDA, &t, static_cast<uint8_t>(p));
      g_priority = static_cast<uint8_t>(p);
    }
    if (at::getHostAllocator(at::kCUDA) != &t) return -3;
  }
  g_recording.store(true, std::memory_order_release);
  return 0;
}

// Stops recording allocations; puts torch's allocator back when ours is still
// the one in place. Frees of recorded blocks keep being reported.
TORCHMEM_API void torchmem_pinned_uninstall(void) {
  std::lock_guard<std::mutex> lock(g_install_mu);
  g_recording.store(false, std::memory_order_release);
  TrackingHostAllocator& t = tracker();
  if (at::getHostAllocator(at::kCUDA) == &t && t.inner())
    at::setHostAllocator(at::kCUDA, t.inner(), g_priority);
}

TORCHMEM_API int torchmem_pinned_active(void) {
  return at::getHostAllocator(at::kCUDA) == &tracker() && g_recording.load();
}

TORCHMEM_API int torchmem_pinned_supported(void) { return 1; }

// Test only: registers the fake inner allocator as the CUDA host allocator
// when torch has none (a CPU-only build). 1 when registered.
TORCHMEM_API int torchmem_pinned_test_register_fake(void) {
  if (at::getHostAllocator(at::kCUDA) != nullptr) return 0;
  static auto* fake = new FakeHostAllocator();
  at::setHostAllocator(at::kCUDA, fake, 0);
  return 1;
}
// Test only: a block from at::getHostAllocator(kCUDA), as pin_memory() gets
// one; returns a handle for the functions below.
TORCHMEM_API void* torchmem_pinned_test_alloc(size_t n) {
  return new at::DataPtr(at::getHostAllocator(at::kCUDA)->allocate(n));
}
TORCHMEM_API void* torchmem_pinned_test_data(void* handle) {
  return static_cast<at::DataPtr*>(handle)->get();
}
TORCHMEM_API int torchmem_pinned_test_record_event(void* handle) {
  auto* p = static_cast<at::DataPtr*>(handle);
  c10::Stream s(c10::Stream::UNSAFE, c10::Device(c10::DeviceType::CUDA, 0), 0);
  return at::getHostAllocator(at::kCUDA)->record_event(p->get(), p->get_context(), s) ? 1 : 0;
}
TORCHMEM_API void torchmem_pinned_test_free(void* handle) {
  delete static_cast<at::DataPtr*>(handle);
}
TORCHMEM_API size_t torchmem_pinned_test_fake_live(void) {
  std::lock_guard<std::mutex> lock(g_fake_mu);
  return fake_blocks().size();
}

#else  // torch < 2.8: no way to replace the CUDA host allocator

TORCHMEM_API int torchmem_pinned_install(void) { return -4; }
TORCHMEM_API void torchmem_pinned_uninstall(void) {}
TORCHMEM_API int torchmem_pinned_active(void) { return 0; }
TORCHMEM_API int torchmem_pinned_supported(void) { return 0; }

#endif
