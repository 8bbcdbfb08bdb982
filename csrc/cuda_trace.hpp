// The CUDA trace tracker's native half: torch's caching allocator stays the
// allocator, and an AllocatorTraceTracker (src/torchmem/_hook/
// cuda_trace_tracker.cpp, built against the user's torch) forwards every
// alloc, free and segment action here. This file turns them into recorder
// events (the GPU recorder slot, as the plugin's) and keeps a model of
// torch's segments: reserved vs allocated per device, the segments, the
// largest free range, and fragmentation.
//
// Threads and locks: trace_event runs inside torch's allocator with its
// per-device lock held, and the calling thread may hold the GIL, so nothing
// here takes the GIL or any lock of torch's. The model has one spin lock,
// held for a few dozen instructions per event; the recorder is called after
// it is released. Queries (Python) copy the model under that lock and
// compute without it.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchmem {

// Called from torch's context recorder, before its allocator lock: keeps the
// calling thread's Python stack (taking the GIL like torch's own gatherer
// does at that point) for the next ALLOC this thread reports. No-op unless
// a recorder listens with stack capture on.
void stash_stack_for_trace();

}  // namespace torchmem

extern "C" {

#define TORCHMEM_TRACE_EXPORT __attribute__((visibility("default")))

// One TraceEntry (actions: cuda_hook_api.h, TORCHMEM_TRACE_*).
TORCHMEM_TRACE_EXPORT void torchmem_cuda_trace_event(int action, int device, uint64_t address,
                                                     uint64_t size, uint64_t stream);
// Whether events reach the recorder (the segment model is kept either way).
TORCHMEM_TRACE_EXPORT void torchmem_cuda_trace_set_recording(int on);
// Blocks and segments live before the tracker started (from torch's
// snapshot). While adopting, frees of unknown addresses are remembered so a
// block freed between the snapshot and its adoption is not adopted.
TORCHMEM_TRACE_EXPORT void torchmem_cuda_trace_set_adopting(int on);
TORCHMEM_TRACE_EXPORT int torchmem_cuda_trace_adopt_block(int device, uint64_t address,
                                                          uint64_t size, uint64_t stream);
TORCHMEM_TRACE_EXPORT int torchmem_cuda_trace_adopt_segment(int device, uint64_t address,
                                                            uint64_t size, uint64_t stream,
                                                            int expandable);
// The blocks the model knows, recorded in the recorder now listening where it
// does not have them live (a profiler the tracker starts feeding while torch
// holds blocks the tracker saw before). Returns how many were recorded.
TORCHMEM_TRACE_EXPORT size_t torchmem_cuda_trace_replay_live(void);
// Forgets the model (tests).
TORCHMEM_TRACE_EXPORT void torchmem_cuda_trace_reset(void);

// Per-device figures, in this order (kTraceStatCount values; device -1 sums):
// reserved, allocated, reserved_peak, allocated_peak, segments, blocks,
// largest_free, free (reserved bytes no block covers), alloc_count,
// free_count, unknown_frees, oom_count, events. Bytes unless a count.
#define TORCHMEM_TRACE_STAT_COUNT 13
TORCHMEM_TRACE_EXPORT int torchmem_cuda_trace_stats(int device, uint64_t* out, int len);
TORCHMEM_TRACE_EXPORT void torchmem_cuda_trace_reset_peak(int device);
// Free bytes of `device`'s segments that lie in free ranges smaller than
// `request` bytes: memory reserved and free that no request of that size can
// use. device -1: all devices.
TORCHMEM_TRACE_EXPORT uint64_t torchmem_cuda_trace_fragmentation(int device, uint64_t request);

// One segment (or mapped range of an expandable segment, coalesced).
struct TorchmemTraceSegment {
  uint64_t address;
  uint64_t size;
  uint64_t stream;
  uint64_t allocated;     // requested bytes of its live blocks
  uint64_t largest_free;  // its largest free range
  uint32_t blocks;
  int32_t device;
  uint32_t expandable;
  uint32_t reserved_;
};
// Up to `capacity` segments of `device` (-1: all), by device then address;
// returns how many exist.
TORCHMEM_TRACE_EXPORT size_t torchmem_cuda_trace_segments(int device, TorchmemTraceSegment* out,
                                                          size_t capacity);
// The model at the last OOM: device, requested, device_free, reserved,
// allocated, largest_free, fragmented (free bytes in ranges smaller than the
// request), count of OOMs, free (reserved bytes no block covered). Returns
// values written (0 before any OOM).
TORCHMEM_TRACE_EXPORT int torchmem_cuda_trace_last_oom(uint64_t* out, int len);
// n ALLOC + FREE_COMPLETED pairs through torchmem_cuda_trace_event; ns.
TORCHMEM_TRACE_EXPORT uint64_t torchmem_cuda_trace_bench(uint64_t n);
}
