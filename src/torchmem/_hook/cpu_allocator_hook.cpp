// torchmem's CPU allocator hook: a c10::Allocator that wraps the one torch
// uses for CPU tensors and reports every allocation and free to torchmem.
//
// Compiled at run time against the installed torch (torchmem/sources/
// cpu_allocator.py), because c10's Allocator is a C++ class whose layout
// belongs to one torch build. It knows nothing of torchmem's recorder: it is
// handed two C function pointers (host_bridge.hpp in torchmem's module).
//
// Why an allocator and not a dispatch mode: it costs one indirect call per
// allocation instead of a Python call per op, sees every thread, and sees
// temporaries that never leave an op.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <atomic>
#include <cstdint>
#include <mutex>

namespace {

using AllocFn = int (*)(void* ptr, size_t size);
using FreeFn = void (*)(void* ptr);

std::atomic<AllocFn> g_alloc{nullptr};  // null while not installed
std::atomic<FreeFn> g_free{nullptr};    // kept after uninstall: frees still land
c10::DeleterFnPtr g_inner_raw_deleter = nullptr;

// A block whose inner DataPtr is not "simple" (its context is not the data
// pointer): we keep the inner DataPtr and free it from our own context.
struct WrappedContext {
  c10::DataPtr inner;
};

void report_free(void* ptr) {
  if (FreeFn fn = g_free.load(std::memory_order_acquire)) fn(ptr);
}

// The free is reported before the memory goes back: the address cannot be
// handed out again before its free is in the log.
void delete_simple(void* ptr) {
  report_free(ptr);
  g_inner_raw_deleter(ptr);
}

void delete_wrapped(void* ctx) {
  auto* w = static_cast<WrappedContext*>(ctx);
  report_free(w->inner.get());
  delete w;  // runs the inner deleter
}

class TrackingCPUAllocator final : public c10::Allocator {
 public:
  void wrap(c10::Allocator* inner) {
    inner_ = inner;
    g_inner_raw_deleter = inner->raw_deleter();
  }
  c10::Allocator* inner() const { return inner_; }

  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr block = inner_->allocate(n);
    void* data = block.get();
    AllocFn fn = g_alloc.load(std::memory_order_acquire);
    if (!fn || !data || !fn(data, n)) return block;  // untracked: left as it was
    c10::Device device = block.device();
    if (g_inner_raw_deleter && block.get_context() == data &&
        block.get_deleter() == g_inner_raw_deleter) {
      // The common case (c10's default allocator). The context stays the
      // data pointer, so copy-on-write and raw_deallocate keep working.
      block.release_context();
      return c10::DataPtr(data, data, &delete_simple, device);
    }
    auto* ctx = new WrappedContext{std::move(block)};
    return c10::DataPtr(data, ctx, &delete_wrapped, device);
  }

  c10::DeleterFnPtr raw_deleter() const override {
    return g_inner_raw_deleter ? &delete_simple : nullptr;
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner_->copy_data(dest, src, count);
  }

 private:
  c10::Allocator* inner_ = nullptr;
};

// Never destroyed: blocks it handed out may be freed during teardown.
TrackingCPUAllocator& tracker() {
  static auto* t = new TrackingCPUAllocator();
  return *t;
}
std::mutex g_mu;
uint8_t g_priority = 0;

}  // namespace

extern "C" {

// Installs the hook (or points an installed one at new functions).
// Returns 0 on success, -1 when torch would not take our allocator, -2 when
// another allocator replaced ours since the last install.
__attribute__((visibility("default"))) int torchmem_cpu_hook_install(AllocFn alloc, FreeFn free) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_free.store(free, std::memory_order_release);
  TrackingCPUAllocator& t = tracker();
  c10::Allocator* current = c10::GetCPUAllocator();
  if (current != &t) {
    // Installed before and since replaced by someone else, who may be
    // calling through us: wrapping them would loop.
    if (t.inner() && current != t.inner()) return -2;
    if (!t.inner()) t.wrap(current);  // set once: freed blocks read it unlocked
    // SetCPUAllocator replaces only at or above the current priority, which
    // it does not tell: climb until ours is the one in place.
    for (int p = 0; p <= 255 && c10::GetCPUAllocator() != &t; ++p) {
      c10::SetCPUAllocator(&t, static_cast<uint8_t>(p));
      g_priority = static_cast<uint8_t>(p);
    }
    if (c10::GetCPUAllocator() != &t) return -1;
  }
  g_alloc.store(alloc, std::memory_order_release);
  return 0;
}

// Stops recording allocations and puts the previous allocator back when ours
// is still the one in place. Frees of recorded blocks keep being reported.
__attribute__((visibility("default"))) void torchmem_cpu_hook_uninstall(void) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_alloc.store(nullptr, std::memory_order_release);
  TrackingCPUAllocator& t = tracker();
  if (c10::GetCPUAllocator() == &t && t.inner()) c10::SetCPUAllocator(t.inner(), g_priority);
}

// 1 while torch's CPU allocator is this hook and it records.
__attribute__((visibility("default"))) int torchmem_cpu_hook_active(void) {
  return c10::GetCPUAllocator() == &tracker() && g_alloc.load() != nullptr;
}

}  // extern "C"
