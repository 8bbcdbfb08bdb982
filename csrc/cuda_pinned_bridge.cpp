// Pinned host memory: what the wrapper of torch's CUDA host allocator
// (src/torchmem/_hook/pinned_host_allocator.cpp) reports, through the hook
// table. Recorded as "Pinned" host memory (device -1) in the recorder the CPU
// allocator hook feeds, with the same rules as the CPU hook's bridge
// (host_bridge.cpp): frees go to whichever recorder holds the block, a
// forked child records nothing, teardown after Python's exit is not recorded.
#include <atomic>
#include <cstdlib>

#include "cuda_plugin.hpp"
#include "host_bridge.hpp"
#include "recorder.hpp"
#include "stack_capture.hpp"

namespace {
std::atomic<bool> g_exiting{false};

torchmem::Recorder* listening() {
  static const bool registered = [] {
    torchmem::host_alloc_fn_address();  // the host bridge's fork handler
    std::atexit([] { g_exiting.store(true, std::memory_order_relaxed); });
    return true;
  }();
  (void)registered;
  if (g_exiting.load(std::memory_order_relaxed)) return nullptr;
  torchmem::Recorder* rec = torchmem::host_recorder();
  return (rec && rec->enabled()) ? rec : nullptr;
}
}  // namespace

extern "C" TORCHMEM_EXPORT int torchmem_pinned_alloc(void* ptr, size_t size) {
  using namespace torchmem;
  Recorder* rec = listening();
  if (!rec || !ptr || size == 0) return 0;
  uint32_t stack = capture_stack_in_allocator();
  rec->record_alloc(reinterpret_cast<uint64_t>(ptr), size, kTypePinned, -1, 0, stack);
  return 1;
}

extern "C" TORCHMEM_EXPORT void torchmem_pinned_free(void* ptr) {
  if (g_exiting.load(std::memory_order_relaxed)) return;
  torchmem_host_free(ptr);
}
