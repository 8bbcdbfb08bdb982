// torchmem's AllocatorTraceTracker: torch's own caching allocator stays the
// allocator, and every TraceEntry it makes (alloc, free, segment actions,
// OOM) is forwarded to torchmem._native (csrc/cuda_trace.cpp), which feeds
// the recorder and keeps the segment model. Built into the same run-time
// library as the allocator class (torchmem/sources/cuda_hook.py).
//
// torch calls trackers with its per-device allocator lock held, on a thread
// that may hold the GIL: the forward takes no lock of torch's, never the GIL,
// and calls no torch function.
//
// Stacks: the lock rules leave one safe moment to read the Python stack,
// before the lock. torch's allocator calls its context recorder there (for
// torch.cuda.memory._record_memory_history's stacks, whose gatherer takes
// the GIL at that point too). torchmem_cuda_tracker_set_stacks(1) installs a
// recorder that stashes the stack in a thread-local for the ALLOC that
// follows on the same thread and returns no context, so torch's own
// snapshots are unchanged. It does so by turning torch's history on with a
// one-entry ring that skips every action; a later
// torch.cuda.memory._record_memory_history call by the program replaces it
// (then allocations are recorded without stacks).
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_hook_common.h"

namespace {

namespace CCA = c10::cuda::CUDACachingAllocator;
// CCA's name for it in every torch version (later ones alias c10's generic one).
using Action = CCA::TraceEntry::Action;

int to_torchmem(Action a) {
  switch (a) {
    case Action::ALLOC: return TORCHMEM_TRACE_ALLOC;
    case Action::FREE_REQUESTED: return TORCHMEM_TRACE_FREE_REQUESTED;
    case Action::FREE_COMPLETED: return TORCHMEM_TRACE_FREE_COMPLETED;
    case Action::SEGMENT_ALLOC: return TORCHMEM_TRACE_SEGMENT_ALLOC;
    case Action::SEGMENT_FREE: return TORCHMEM_TRACE_SEGMENT_FREE;
    case Action::SEGMENT_MAP: return TORCHMEM_TRACE_SEGMENT_MAP;
    case Action::SEGMENT_UNMAP: return TORCHMEM_TRACE_SEGMENT_UNMAP;
    case Action::SNAPSHOT: return TORCHMEM_TRACE_SNAPSHOT;
    case Action::OOM: return TORCHMEM_TRACE_OOM;
  }
  return -1;  // an action this build does not know: ignored
}

void forward(const CCA::TraceEntry& te) {
  const TorchmemCudaHookApi* a = torchmem_hook::api();
  if (!a) return;
  const int action = to_torchmem(te.action_);
  if (action < 0) return;
  a->trace_event(action, static_cast<int>(te.device_), static_cast<uint64_t>(te.addr_),
                 static_cast<uint64_t>(te.size_), reinterpret_cast<uint64_t>(te.stream_));
}

std::shared_ptr<c10::GatheredContext> stash_context() {
  if (const TorchmemCudaHookApi* a = torchmem_hook::api()) a->stash_stack();
  return nullptr;
}

std::mutex g_mu;
bool g_attached = false;
bool g_stacks = false;

}  // namespace

// Attaches the tracker to torch's CUDA allocator (once per process; torch
// has no way to detach one). torch must have initialised CUDA (its
// per-device allocators exist from then on). Returns 0, or -1 with the
// reason in `err` (an allocator without trace trackers: the cudaMallocAsync
// backend, a pluggable allocator).
extern "C" __attribute__((visibility("default"))) int torchmem_cuda_tracker_attach(char* err,
                                                                                  size_t len) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_attached) return 0;
  if (!torchmem_hook::api()) {
    torchmem_hook::copy_out("torchmem's CUDA library is not attached", err, len);
    return -1;
  }
  CCA::CUDAAllocator* alloc = CCA::get();
  if (!alloc || !alloc->initialized()) {
    torchmem_hook::copy_out("torch's CUDA allocator is not initialised yet", err, len);
    return -1;
  }
  try {
    alloc->attachAllocatorTraceTracker(&forward);
  } catch (const c10::Error& e) {
    torchmem_hook::copy_out(std::string("torch's CUDA allocator (") + alloc->name() +
                                ") takes no trace tracker: " + e.what_without_backtrace(),
                            err, len);
    return -1;
  }
  g_attached = true;
  return 0;
}

// Turns the stack stash on (1) or off (0). Returns 0, or -1 with the reason.
extern "C" __attribute__((visibility("default"))) int torchmem_cuda_tracker_set_stacks(
    int on, char* err, size_t len) {
  std::lock_guard<std::mutex> lock(g_mu);
  if ((on != 0) == g_stacks) return 0;
#if TORCHMEM_HAVE_RECORD_HISTORY_SKIP
  static const std::vector<std::string> kEveryAction = {
      "alloc", "free_requested", "free_completed", "segment_alloc", "segment_free",
      "segment_map", "segment_unmap", "snapshot", "oom"};
  try {
    if (on) {
      CCA::recordHistory(true, &stash_context, 1, CCA::RecordContext::STATE, false, kEveryAction);
    } else {
      CCA::recordHistory(false, nullptr, 1, CCA::RecordContext::NEVER, false, {});
    }
  } catch (const c10::Error& e) {
    torchmem_hook::copy_out(e.what_without_backtrace(), err, len);
    return -1;
  }
  g_stacks = on != 0;
  return 0;
#else
  (void)on;
  torchmem_hook::copy_out("stacks for the trace tracker need torch >= 2.11", err, len);
  return -1;
#endif
}
