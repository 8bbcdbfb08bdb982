// Checks csrc/cuda_runtime.hpp against the real CUDA runtime headers: every
// constant, the one struct, and the signature of every function the plugin
// resolves with dlsym. csrc/ builds without CUDA headers, so this is where its
// hand-written declarations meet the truth. Compiled and linked against the
// CUDA runtime package's headers and libcudart by scripts/check_cuda_build.sh
// (a function libcudart does not export fails the link); it never runs.
#include <cuda.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "cuda_runtime.hpp"

namespace cu = torchmem::cuda;

// -- constants -----------------------------------------------------------------
static_assert(cu::kSuccess == cudaSuccess, "cudaSuccess");
static_assert(cu::kErrorMemoryAllocation == cudaErrorMemoryAllocation, "cudaErrorMemoryAllocation");
static_assert(cu::kErrorPeerAccessAlreadyEnabled == cudaErrorPeerAccessAlreadyEnabled,
              "cudaErrorPeerAccessAlreadyEnabled");
static_assert(cu::kEventDisableTiming == cudaEventDisableTiming, "cudaEventDisableTiming");
static_assert(cu::kStreamNonBlocking == cudaStreamNonBlocking, "cudaStreamNonBlocking");
static_assert(cu::kMemPoolAttrReleaseThreshold == cudaMemPoolAttrReleaseThreshold, "release");
static_assert(cu::kMemPoolAttrReservedMemCurrent == cudaMemPoolAttrReservedMemCurrent, "reserved");
static_assert(cu::kMemPoolAttrReservedMemHigh == cudaMemPoolAttrReservedMemHigh, "reserved high");
static_assert(cu::kMemPoolAttrUsedMemCurrent == cudaMemPoolAttrUsedMemCurrent, "used");
static_assert(cu::kDevAttrMemoryPoolsSupported == cudaDevAttrMemoryPoolsSupported, "pools");
static_assert(cu::kMemLocationTypeDevice == cudaMemLocationTypeDevice, "location device");
static_assert(cu::kMemAccessFlagsProtReadWrite == cudaMemAccessFlagsProtReadWrite, "rw");

// -- the access descriptor -------------------------------------------------------
static_assert(sizeof(cu::MemAccessDesc) == sizeof(cudaMemAccessDesc), "cudaMemAccessDesc size");
static_assert(offsetof(cu::MemAccessDesc, location_type) ==
                  offsetof(cudaMemAccessDesc, location) + offsetof(cudaMemLocation, type),
              "cudaMemAccessDesc.location.type");
static_assert(offsetof(cu::MemAccessDesc, location_id) ==
                  offsetof(cudaMemAccessDesc, location) + offsetof(cudaMemLocation, id),
              "cudaMemAccessDesc.location.id");
static_assert(offsetof(cu::MemAccessDesc, flags) == offsetof(cudaMemAccessDesc, flags),
              "cudaMemAccessDesc.flags");

// -- signatures ----------------------------------------------------------------------
// Two signatures agree when, parameter by parameter, both are pointers, or
// both are integers (enums included) of one size: what the calling
// convention passes alike. (An enum's underlying type is the compiler's
// choice: cudaError_t is unsigned with g++, torchmem's Error is int.)
template <size_t N>
struct sized_int;
template <>
struct sized_int<4> {
  using type = int32_t;
};
template <>
struct sized_int<8> {
  using type = int64_t;
};
template <typename T, typename = void>
struct norm {
  using type = T;
};
template <typename T>
struct norm<T, std::enable_if_t<std::is_enum_v<T> || std::is_integral_v<T>>> {
  using type = typename sized_int<sizeof(T)>::type;
};
template <typename T>
struct norm<T*, void> {
  using type = void*;
};
template <typename F>
struct sig;
template <typename R, typename... A>
struct sig<R (*)(A...)> {
  using type = typename norm<R>::type (*)(typename norm<A>::type...);
};
template <typename Real, typename Ours>
constexpr bool same_abi = std::is_same_v<typename sig<Real>::type, typename sig<Ours>::type>;

#define CHECK_FN(field, real)                                                          \
  static_assert(same_abi<decltype(&real), decltype(cu::Runtime{}.field)>, #real);     \
  void* const kAddress_##field = reinterpret_cast<void*>(&real);

CHECK_FN(Malloc, cudaMalloc)
CHECK_FN(Free, cudaFree)
CHECK_FN(MallocAsync, cudaMallocAsync)
CHECK_FN(FreeAsync, cudaFreeAsync)
CHECK_FN(DeviceGetDefaultMemPool, cudaDeviceGetDefaultMemPool)
CHECK_FN(MemPoolSetAttribute, cudaMemPoolSetAttribute)
CHECK_FN(MemPoolGetAttribute, cudaMemPoolGetAttribute)
CHECK_FN(MemPoolTrimTo, cudaMemPoolTrimTo)
CHECK_FN(MemGetInfo, cudaMemGetInfo)
CHECK_FN(DeviceGetAttribute, cudaDeviceGetAttribute)
CHECK_FN(EventCreateWithFlags, cudaEventCreateWithFlags)
CHECK_FN(EventRecord, cudaEventRecord)
CHECK_FN(EventSynchronize, cudaEventSynchronize)
CHECK_FN(EventDestroy, cudaEventDestroy)
CHECK_FN(StreamWaitEvent, cudaStreamWaitEvent)
CHECK_FN(StreamSynchronize, cudaStreamSynchronize)
CHECK_FN(DeviceSynchronize, cudaDeviceSynchronize)
CHECK_FN(GetDevice, cudaGetDevice)
CHECK_FN(SetDevice, cudaSetDevice)
CHECK_FN(GetLastError, cudaGetLastError)
CHECK_FN(PeekAtLastError, cudaPeekAtLastError)
CHECK_FN(GetErrorString, cudaGetErrorString)
CHECK_FN(StreamCreateWithFlags, cudaStreamCreateWithFlags)
CHECK_FN(StreamGetDevice, cudaStreamGetDevice)
CHECK_FN(DeviceCanAccessPeer, cudaDeviceCanAccessPeer)
CHECK_FN(DeviceEnablePeerAccess, cudaDeviceEnablePeerAccess)
CHECK_FN(MemPoolSetAccess, cudaMemPoolSetAccess)

// The driver functions cuda_runtime.cpp resolves from libcuda (not linked:
// libcuda comes with the driver, not the runtime package).
static_assert(same_abi<decltype(&cuDeviceGet),
                       cu::DriverResult (*)(cu::DriverDevice*, int)>, "cuDeviceGet");
static_assert(same_abi<decltype(&cuDevicePrimaryCtxGetState),
                       cu::DriverResult (*)(cu::DriverDevice, unsigned*, int*)>,
              "cuDevicePrimaryCtxGetState");

int main() { return kAddress_Malloc == nullptr; }
