// The few CUDA runtime entry points the plugin needs, resolved at run time.
//
// torchmem builds with g++ alone and must import on machines without CUDA,
// so nothing here includes a CUDA header: the handful of types and enum
// values used are declared below with the values of cuda_runtime_api.h
// (stable since CUDA 11.2; scripts/check_cuda_build.sh compiles
// tests/native/cuda_abi_check.cpp, which checks every value and signature
// here against the real headers). The library is the libcudart that torch's
// libc10_cuda.so links, so the plugin and torch share one runtime (one set of
// streams, pools and error state).
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
constexpr Error kErrorPeerAccessAlreadyEnabled = 704;  // cudaErrorPeerAccessAlreadyEnabled
constexpr unsigned kEventDisableTiming = 0x02;  // cudaEventDisableTiming
constexpr unsigned kStreamNonBlocking = 0x01;   // cudaStreamNonBlocking
constexpr int kMemPoolAttrReleaseThreshold = 4;      // cudaMemPoolAttrReleaseThreshold
constexpr int kMemPoolAttrReservedMemCurrent = 5;    // cudaMemPoolAttrReservedMemCurrent
constexpr int kMemPoolAttrReservedMemHigh = 6;       // cudaMemPoolAttrReservedMemHigh
constexpr int kMemPoolAttrUsedMemCurrent = 7;        // cudaMemPoolAttrUsedMemCurrent
constexpr int kDevAttrMemoryPoolsSupported = 115;    // cudaDevAttrMemoryPoolsSupported
constexpr int kMemLocationTypeDevice = 1;            // cudaMemLocationTypeDevice
constexpr int kMemAccessFlagsProtReadWrite = 3;      // cudaMemAccessFlagsProtReadWrite

// struct cudaMemAccessDesc: { struct cudaMemLocation { enum type; int id; }; enum flags; }
struct MemAccessDesc {
  int location_type;
  int location_id;
  int flags;
};

// libcuda's cuDeviceGet / cuDevicePrimaryCtxGetState (CUresult, CUdevice):
// the only way to ask "does this device have a context?" without creating one.
using DriverResult = int;
using DriverDevice = int;

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
  Error (*PeekAtLastError)() = nullptr;
  const char* (*GetErrorString)(Error error) = nullptr;
  // Optional (null when absent): unifying streams, peer access.
  Error (*StreamCreateWithFlags)(Stream* stream, unsigned flags) = nullptr;
  Error (*StreamGetDevice)(Stream stream, int* device) = nullptr;  // CUDA >= 12.8
  Error (*DeviceCanAccessPeer)(int* can, int device, int peer) = nullptr;
  Error (*DeviceEnablePeerAccess)(int peer, unsigned flags) = nullptr;
  Error (*MemPoolSetAccess)(MemPool pool, const MemAccessDesc* descs, size_t count) = nullptr;

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

// Whether `device` has a primary context (so making it current costs no
// memory). Unknown (no driver entry points) counts as true: the caller then
// behaves as it did before it could ask.
bool has_primary_context(const Runtime* rt, int device);

// Clears the runtime's last-error slot only when it holds `err`, the error of
// a call of ours that just failed: an error torch has not yet checked (a
// failed kernel launch) must stay for torch to report.
void clear_own_error(const Runtime* rt, Error err);

// Switches the calling thread to `device` for the guard's lifetime when it
// is not already current (the runtime keeps the current device per thread).
// The previous device is made current again only if it has a primary
// context: a thread that never used CUDA reports device 0, and making device
// 0 current would create a context there (about 500 MB), which is what
// torch's own device guards avoid too (c10::cuda::MaybeExchangeDevice).
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
