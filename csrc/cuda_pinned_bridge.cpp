// Pinned host memory: what the wrapper of torch's CUDA host allocator
// (src/torchmem/_hook/pinned_host_allocator.cpp) reports, through the hook
// table. Recorded as "Pinned" host memory (device -1) in the recorder the CPU
// allocator hook feeds, by the CPU hook's own bridge (host_bridge.cpp): frees
// go to whichever recorder holds the block, a forked child records nothing,
// teardown after Python's exit is not recorded.
#include "cuda_plugin.hpp"
#include "host_bridge.hpp"
#include "recorder.hpp"

extern "C" TORCHMEM_EXPORT int torchmem_pinned_alloc(void* ptr, size_t size) {
  return torchmem::record_host_alloc(ptr, size, torchmem::kTypePinned);
}

extern "C" TORCHMEM_EXPORT void torchmem_pinned_free(void* ptr) { torchmem_host_free(ptr); }
