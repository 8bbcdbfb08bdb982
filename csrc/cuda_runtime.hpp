// The few CUDA runtime entry points the plugin needs, resolved at run time.
//
// torchmem builds with g++ alone and must import on machines without CUDA,
// so nothing here includes a CUDA header: the handful of types and enum
// values used are declared below with the values of cuda_runtime_api.h
// (stable since CUDA 11.2). The library is the libcudart that torch already
// loaded, so the plugin and torch share one runtime (one set of streams,
// pools and error state).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace torchmem {
namespace cuda {

using Error = int;           // cudaError_t
using Stream = void*;        // cudaStream_t
using Event = void*;         // cudaEvent_t
using MemPool = void*;       // cudaMemPool_t

constexpr Error kSuccess = 0;                // cudaSuccess
constexpr Error kErrorMemoryAllocation = 2;  // cudaErrorMemoryAllocation
constexpr unsigned kEventDisableTiming = 0x02;  // cudaEventDisableTiming
constexpr int kMemPoolAttrReleaseThreshold = 4;      // cudaMemPoolAttrReleaseThreshold
constexpr int kMemPoolAttrReservedMemCurrent = 5;    // cudaMemPoolAttrReservedMemCurrent
constexpr int kMemPoolAttrReservedMemHigh = 6;       // cudaMemPoolAttrReservedMemHigh
constexpr int kDevAttrMemoryPoolsSupported = 115;    // cudaDevAttrMemoryPoolsSupported

// Function pointers into libcudart; every member is null when not found.
struct Runtime {
  Error (*Malloc)(void** ptr, size_t size) = nullptr;
  Error (*Free)(void* ptr) = nullptr;
  Error (*MallocAsync)(void** ptr, size_t size, Stream stream) = nullptr;
  Error (*FreeAsync)(void* ptr, Stream stream) = nullptr;
  Error (*DeviceGetDefaultMemPool)(MemPool* pool, int device) = nullptr;
  Error (*MemPoolSetAttribute)(MemPool pool, int attr, void* value) = nullptr;
  Error (*MemPoolGetAttribute)(MemPool pool, int attr, void* value) = nullptr;
  Error (*MemPoolTrimTo)(MemPool pool, size_t min_bytes_to_keep) = nullptr;
  Error (*MemGetInfo)(size_t* free_bytes, size_t* total_bytes) = nullptr;
  Error (*DeviceGetAttribute)(int* value, int attr, int device) = nullptr;
  Error (*EventCreateWithFlags)(Event* event, unsigned flags) = nullptr;
  Error (*EventRecord)(Event event, Stream stream) = nullptr;
  Error (*EventSynchronize)(Event event) = nullptr;
  Error (*EventDestroy)(Event event) = nullptr;
  Error (*StreamWaitEvent)(Stream stream, Event event, unsigned flags) = nullptr;
  Error (*StreamSynchronize)(Stream stream) = nullptr;
  Error (*DeviceSynchronize)() = nullptr;
  Error (*GetDevice)(int* device) = nullptr;
  Error (*SetDevice)(int device) = nullptr;
  Error (*GetLastError)() = nullptr;
  const char* (*GetErrorString)(Error error) = nullptr;

  bool complete = false;      // every function above was found
  bool has_async = false;     // the stream-ordered allocator entry points exist
  std::string path;           // the library the symbols came from
  std::string missing;        // names not found (diagnostics)
};

// The runtime, resolved on first call (thread safe; never throws). Returns
// null when no libcudart could be found or a required symbol is missing.
const Runtime* runtime();

// Where the runtime came from, or why it was not found (for messages).
std::string runtime_description();

// Switches the calling thread to `device` for the guard's lifetime when it
// is not already current (the runtime keeps the current device per thread).
class DeviceGuard {
 public:
  DeviceGuard(const Runtime* rt, int device);
  ~DeviceGuard();
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  const Runtime* rt_;
  int previous_ = -1;
};

}  // namespace cuda
}  // namespace torchmem
