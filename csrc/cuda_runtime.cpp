// Finding the libcudart torch loaded and resolving the plugin's symbols.
#include "cuda_runtime.hpp"

#include <dlfcn.h>
#include <link.h>

#include <cstring>
#include <mutex>

namespace torchmem {
namespace cuda {
namespace {

// Newest first: a process that has several loaded (rare) most likely runs
// torch against the newest.
const char* const kNames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                              "libcudart.so.11", "libcudart.so"};

int find_loaded_cb(struct dl_phdr_info* info, size_t, void* data) {
  const char* name = info->dlpi_name;
  if (!name || !*name) return 0;
  const char* base = std::strrchr(name, '/');
  base = base ? base + 1 : name;
  if (std::strncmp(base, "libcudart", 9) == 0) {
    *static_cast<std::string*>(data) = name;
    return 1;
  }
  return 0;
}

// Opens the libcudart already mapped into the process without loading a new
// copy: a second runtime would have its own per-thread state and error codes.
void* open_loaded(std::string* path) {
  for (const char* name : kNames) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_NOLOAD)) {
      *path = name;
      return h;
    }
  }
  // Wheels ship it under versioned or hashed names (libcudart-abc123.so.12).
  std::string found;
  dl_iterate_phdr(find_loaded_cb, &found);
  if (!found.empty()) {
    if (void* h = dlopen(found.c_str(), RTLD_NOW | RTLD_NOLOAD)) {
      *path = found;
      return h;
    }
  }
  return nullptr;
}

// Last resort for C++ users of the plugin outside torch: load one ourselves.
void* open_new(std::string* path) {
  for (const char* name : kNames) {
    if (void* h = dlopen(name, RTLD_NOW | RTLD_GLOBAL)) {
      *path = name;
      return h;
    }
  }
  return nullptr;
}

template <typename F>
void resolve(void* handle, const char* name, F* out, std::string* missing) {
  *out = reinterpret_cast<F>(dlsym(handle, name));
  if (!*out) {
    if (!missing->empty()) *missing += ", ";
    *missing += name;
  }
}

// Immortal: the plugin may be called during static destruction at exit.
Runtime& g_runtime = *new Runtime;
std::string& g_description = *new std::string;
std::once_flag g_once;

void load() {
  std::string path;
  void* h = open_loaded(&path);
  if (!h) h = open_new(&path);
  if (!h) {
    g_description = "no libcudart found (tried the copy torch loaded, then ";
    g_description += kNames[1];
    g_description += " and friends)";
    return;
  }
  Runtime& r = g_runtime;
  std::string missing;
  resolve(h, "cudaMalloc", &r.Malloc, &missing);
  resolve(h, "cudaFree", &r.Free, &missing);
  resolve(h, "cudaMemGetInfo", &r.MemGetInfo, &missing);
  resolve(h, "cudaDeviceGetAttribute", &r.DeviceGetAttribute, &missing);
  resolve(h, "cudaEventCreateWithFlags", &r.EventCreateWithFlags, &missing);
  resolve(h, "cudaEventRecord", &r.EventRecord, &missing);
  resolve(h, "cudaEventSynchronize", &r.EventSynchronize, &missing);
  resolve(h, "cudaEventDestroy", &r.EventDestroy, &missing);
  resolve(h, "cudaStreamWaitEvent", &r.StreamWaitEvent, &missing);
  resolve(h, "cudaStreamSynchronize", &r.StreamSynchronize, &missing);
  resolve(h, "cudaDeviceSynchronize", &r.DeviceSynchronize, &missing);
  resolve(h, "cudaGetDevice", &r.GetDevice, &missing);
  resolve(h, "cudaSetDevice", &r.SetDevice, &missing);
  resolve(h, "cudaGetLastError", &r.GetLastError, &missing);
  resolve(h, "cudaGetErrorString", &r.GetErrorString, &missing);
  bool basic = missing.empty();
  resolve(h, "cudaMallocAsync", &r.MallocAsync, &missing);
  resolve(h, "cudaFreeAsync", &r.FreeAsync, &missing);
  resolve(h, "cudaDeviceGetDefaultMemPool", &r.DeviceGetDefaultMemPool, &missing);
  resolve(h, "cudaMemPoolSetAttribute", &r.MemPoolSetAttribute, &missing);
  resolve(h, "cudaMemPoolGetAttribute", &r.MemPoolGetAttribute, &missing);
  resolve(h, "cudaMemPoolTrimTo", &r.MemPoolTrimTo, &missing);
  r.path = path;
  r.missing = missing;
  r.complete = missing.empty();
  r.has_async = basic && r.MallocAsync && r.FreeAsync && r.DeviceGetDefaultMemPool &&
                r.MemPoolSetAttribute && r.MemPoolGetAttribute && r.MemPoolTrimTo;
  g_description = path;
  if (!missing.empty()) g_description += " (missing: " + missing + ")";
  // Without the basic set the library is unusable; report it as absent.
  if (!basic) r.path.clear();
}

}  // namespace

const Runtime* runtime() {
  std::call_once(g_once, load);
  return g_runtime.path.empty() ? nullptr : &g_runtime;
}

std::string runtime_description() {
  std::call_once(g_once, load);
  return g_description;
}

DeviceGuard::DeviceGuard(const Runtime* rt, int device) : rt_(rt) {
  int current = -1;
  if (!rt_ || device < 0 || rt_->GetDevice(&current) != kSuccess) {
    rt_ = nullptr;
    return;
  }
  if (current != device && rt_->SetDevice(device) == kSuccess) {
    previous_ = current;
  }
}

DeviceGuard::~DeviceGuard() {
  if (rt_ && previous_ >= 0) rt_->SetDevice(previous_);
}

}  // namespace cuda
}  // namespace torchmem
