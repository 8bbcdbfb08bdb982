// Shared by the translation units of torchmem's run-time-built CUDA library
// (cuda_allocator.cpp, cuda_trace_tracker.cpp): the entry-point table of
// torchmem._native, handed over once by torchmem_cuda_hook_attach, and the
// torch version switches.
#pragma once

#include <torch/version.h>

#include <cstddef>
#include <string>

#include "cuda_hook_api.h"

// torch's CUDAAllocator interface as compiled against: 2.11 and 2.13 are
// checked in CI (scripts/check_cuda_build.sh); older versions differ in
// many virtuals and only get the trace tracker.
#define TORCHMEM_TORCH_AT_LEAST(major, minor) \
  (TORCH_VERSION_MAJOR > (major) ||           \
   (TORCH_VERSION_MAJOR == (major) && TORCH_VERSION_MINOR >= (minor)))
#define TORCHMEM_HAVE_ALLOCATOR_CLASS TORCHMEM_TORCH_AT_LEAST(2, 11)
// recordHistory(enabled, recorder, max_entries, when, clear, skip_actions).
#define TORCHMEM_HAVE_RECORD_HISTORY_SKIP TORCHMEM_TORCH_AT_LEAST(2, 11)

namespace torchmem_hook {

// The table; null before torchmem_cuda_hook_attach.
const TorchmemCudaHookApi* api();

// The text of the table's last_message for this thread.
std::string last_message();

// Copies `text` into a caller's buffer (NUL terminated); returns its length.
size_t copy_out(const std::string& text, char* buf, size_t len);

}  // namespace torchmem_hook
