/* The C interface between torchmem's own module (torchmem._native, built
 * without torch) and the C++ built against the user's torch at first use
 * (cuda_allocator.cpp, cuda_trace_tracker.cpp, pinned_host_allocator.cpp).
 *
 * _native fills one table of function pointers (torchmem_cuda_hook_api());
 * Python hands its address to the run-time-built library, which calls
 * nothing else of torchmem. All logic (backends, bookkeeping, graph-capture
 * deferral, record_stream fencing, the segment model, the recorder feed)
 * lives behind the table, where CPU tests reach it; the run-time-built
 * classes only translate torch's C++ calls. Every function is safe from any
 * thread, never throws and never takes the GIL except stash_stack.
 *
 * This header is C and stable within one torchmem version: the table
 * carries its version and size, and a library built for another layout
 * refuses it (torchmem_cuda_hook_attach returns -1).
 */
#ifndef TORCHMEM_CUDA_HOOK_API_H_
#define TORCHMEM_CUDA_HOOK_API_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define TORCHMEM_CUDA_HOOK_API_VERSION 1

/* alloc() results */
#define TORCHMEM_ALLOC_OK 0
#define TORCHMEM_ALLOC_OOM 1   /* out of memory after one cache release and retry */
#define TORCHMEM_ALLOC_ERROR 2 /* any other CUDA failure; last_message says which */

/* alloc() flags */
#define TORCHMEM_ALLOC_CAPTURED 1u /* made on a stream a CUDA graph is capturing */

/* trace_event() actions: torch's TraceEntry::Action, by name, not by value
 * (the adapter maps each one explicitly, so a reordered enum cannot shift). */
#define TORCHMEM_TRACE_ALLOC 0
#define TORCHMEM_TRACE_FREE_REQUESTED 1
#define TORCHMEM_TRACE_FREE_COMPLETED 2
#define TORCHMEM_TRACE_SEGMENT_ALLOC 3
#define TORCHMEM_TRACE_SEGMENT_FREE 4
#define TORCHMEM_TRACE_SEGMENT_MAP 5
#define TORCHMEM_TRACE_SEGMENT_UNMAP 6
#define TORCHMEM_TRACE_SNAPSHOT 7
#define TORCHMEM_TRACE_OOM 8 /* address = the device's free bytes, size = the request */

/* One live block of the plugin (snapshot()). */
typedef struct TorchmemBlock {
  uint64_t address;
  uint64_t size;      /* bytes handed out (= requested: the plugin does not round) */
  uint64_t stream;    /* the stream it was allocated for */
  int32_t device;
  uint32_t flags;     /* TORCHMEM_ALLOC_CAPTURED; 2 = its free waits for a capture to end */
} TorchmemBlock;

typedef struct TorchmemCudaHookApi {
  uint32_t version; /* TORCHMEM_CUDA_HOOK_API_VERSION */
  uint32_t size;    /* sizeof(TorchmemCudaHookApi) */

  /* -- the allocator ---------------------------------------------------- */
  int (*alloc)(void** out, size_t size, int device, void* stream, unsigned flags);
  void (*free)(void* ptr);
  /* stream_device -1: unknown (found from the stream when the runtime can). */
  void (*record_stream)(void* ptr, void* stream, int stream_device);
  void (*init)(int device_count);
  void (*empty_cache)(void);
  void (*set_memory_fraction)(double fraction, int device);
  double (*memory_fraction)(int device);
  /* The largest block one allocation on `device` could get now (cacheInfo). */
  uint64_t (*largest_free_block)(int device);
  /* The block containing ptr and its size; *size = 0 when unknown. */
  void* (*base_allocation)(void* ptr, size_t* size);
  /* torchmem_plugin_stats's layout (cuda_plugin.hpp: DeviceCounters). */
  int (*stats)(int device, uint64_t* out, int len);
  void (*reset_peak)(int device);
  void (*reset_accumulated)(int device);
  /* Copies up to `capacity` live blocks, by address; returns how many exist. */
  size_t (*live_blocks)(TorchmemBlock* out, size_t capacity);
  /* A CUDA graph capture routes allocations on `device`: 0, or -1 when the
   * backend cannot allocate during capture (last_message says what to use). */
  int (*capture_begin)(int device);
  /* The capture ended: its side streams rejoin `capture_stream`, deferred
   * frees run once no capture is left. */
  void (*capture_end)(int device, void* capture_stream);
  /* `device` may read and write memory of `peer` (torch's enablePeerAccess). */
  int (*enable_peer_access)(int device, int peer);
  int (*mem_info)(int device, uint64_t* free_bytes, uint64_t* total_bytes);
  /* Why this thread's last failed call failed (NUL terminated; full length). */
  size_t (*last_message)(char* buf, size_t len);
  const char* (*backend_name)(void);

  /* -- the trace tracker (torch's caching allocator kept) ---------------- */
  void (*trace_event)(int action, int device, uint64_t address, uint64_t size,
                      uint64_t stream);
  /* Before torch's allocator lock (its context recorder): the caller's
   * Python stack, kept for this thread's next ALLOC. May take the GIL. */
  void (*stash_stack)(void);

  /* -- pinned host memory ------------------------------------------------ */
  int (*pinned_alloc)(void* ptr, size_t size); /* 1 when recorded */
  void (*pinned_free)(void* ptr);
} TorchmemCudaHookApi;

#ifdef __cplusplus
}
#endif

#endif /* TORCHMEM_CUDA_HOOK_API_H_ */
