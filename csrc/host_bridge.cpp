#include "host_bridge.hpp"

#include <pthread.h>

#include <atomic>
#include <cstdlib>

#include "recorder.hpp"
#include "stack_capture.hpp"

namespace torchmem {
namespace {
// After Python's exit handlers the session has closed its profiler; storages
// freed while the interpreter tears down are left unrecorded (as the CUDA
// plugin does) rather than fed to a recorder nobody reads.
std::atomic<bool> g_exiting{false};

// A forked child (a DataLoader worker) inherits the hook and a copy of the
// recorder that nobody reads: its allocations are not recorded.
void forget_recorder_in_child() { forget_host_recorders(); }

void register_handlers_once() {
  static bool registered = [] {
    std::atexit([] { g_exiting.store(true, std::memory_order_relaxed); });
    pthread_atfork(nullptr, nullptr, &forget_recorder_in_child);
    return true;
  }();
  (void)registered;
}

Recorder* listening() {
  if (g_exiting.load(std::memory_order_relaxed)) return nullptr;
  Recorder* rec = host_recorder();
  return (rec && rec->enabled()) ? rec : nullptr;
}
}  // namespace

uintptr_t host_alloc_fn_address() {
  register_handlers_once();  // before the hook can call us
  return reinterpret_cast<uintptr_t>(&torchmem_host_alloc);
}
uintptr_t host_free_fn_address() { return reinterpret_cast<uintptr_t>(&torchmem_host_free); }

}  // namespace torchmem

int torchmem::record_host_alloc(void* ptr, size_t size, uint16_t type_id) {
  register_handlers_once();
  Recorder* rec = listening();
  if (!rec || !ptr || size == 0) return 0;
  uint32_t stack = capture_stack_in_allocator();
  rec->record_alloc(reinterpret_cast<uint64_t>(ptr), size, type_id, -1, 0, stack);
  return 1;
}

extern "C" int torchmem_host_alloc(void* ptr, size_t size) {
  return torchmem::record_host_alloc(ptr, size, torchmem::kTypeCPU);
}

extern "C" void torchmem_host_free(void* ptr) {
  using namespace torchmem;
  if (g_exiting.load(std::memory_order_relaxed)) return;
  record_host_free(reinterpret_cast<uint64_t>(ptr));
}
