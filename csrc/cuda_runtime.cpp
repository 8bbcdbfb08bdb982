// Finding the libcudart torch loaded and resolving the plugin's symbols.
#include "cuda_runtime.hpp"

#include <dlfcn.h>
#include <link.h>

#include <atomic>
#include <cstring>
#include <mutex>

namespace torchmem {
namespace cuda {
namespace {

// Newest first: a process that has several loaded (rare) most likely runs
// torch against the newest. Only used when torch's own link is not found.
const char* const kNames[] = {"libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0",
                              "libcudart.so.11", "libcudart.so"};

// torch's CUDA code lives in libc10_cuda.so (and libtorch_cuda.so), linked
// against the libcudart torch was built with.
const char* const kTorchLibs[] = {"libc10_cuda.so", "libtorch_cuda.so"};

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

// The libcudart torch's own CUDA library links: dlsym on a library's handle
// searches that library and its dependencies in load order, so a runtime
// symbol found through libc10_cuda's handle is the one it binds to, and
// dladdr names the file it lives in. Name order would pick the wrong copy in a
// process holding two (a CUDA 12 extension next to torch's CUDA 13 runtime).
void* open_torchs(std::string* path) {
  for (const char* lib : kTorchLibs) {
    void* torch_lib = dlopen(lib, RTLD_NOW | RTLD_NOLOAD);
    if (!torch_lib) continue;
    void* sym = dlsym(torch_lib, "cudaGetDevice");
    Dl_info info{};
    void* h = nullptr;
    if (sym && dladdr(sym, &info) && info.dli_fname) {
      h = dlopen(info.dli_fname, RTLD_NOW | RTLD_NOLOAD);
      if (h) *path = info.dli_fname;
    }
    dlclose(torch_lib);  // drops the reference NOLOAD took; torch keeps its own
    if (h) return h;
  }
  return nullptr;
}

// Opens the libcudart already mapped into the process without loading a new
// copy: a second runtime would have its own per-thread state and error codes.
void* open_loaded(std::string* path) {
  if (void* h = open_torchs(path)) return h;
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
  resolve(h, "cudaPeekAtLastError", &r.PeekAtLastError, &missing);
  resolve(h, "cudaGetErrorString", &r.GetErrorString, &missing);
  bool basic = missing.empty();
  std::string optional;
  resolve(h, "cudaStreamCreateWithFlags", &r.StreamCreateWithFlags, &optional);
  resolve(h, "cudaStreamGetDevice", &r.StreamGetDevice, &optional);
  resolve(h, "cudaDeviceCanAccessPeer", &r.DeviceCanAccessPeer, &optional);
  resolve(h, "cudaDeviceEnablePeerAccess", &r.DeviceEnablePeerAccess, &optional);
  resolve(h, "cudaMemPoolSetAccess", &r.MemPoolSetAccess, &optional);
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

namespace {
// libcuda is loaded by the runtime at its own initialisation, possibly after
// the plugin resolved the runtime: looked up again until found.
struct Driver {
  std::atomic<DriverResult (*)(DriverDevice*, int)> device_get{nullptr};
  std::atomic<DriverResult (*)(DriverDevice, unsigned*, int*)> ctx_state{nullptr};
};
Driver& g_driver = *new Driver;

bool driver_loaded(Driver* d) {
  if (d->ctx_state.load(std::memory_order_acquire)) return true;
  void* drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (!drv) return false;
  auto get = reinterpret_cast<DriverResult (*)(DriverDevice*, int)>(dlsym(drv, "cuDeviceGet"));
  auto state = reinterpret_cast<DriverResult (*)(DriverDevice, unsigned*, int*)>(
      dlsym(drv, "cuDevicePrimaryCtxGetState"));
  dlclose(drv);  // the runtime holds its own reference
  if (!get || !state) return false;
  d->device_get.store(get, std::memory_order_release);
  d->ctx_state.store(state, std::memory_order_release);
  return true;
}
}  // namespace

bool has_primary_context(const Runtime* rt, int device) {
  if (!rt || device < 0) return false;
  if (!driver_loaded(&g_driver)) {
    // No driver in the process: no context exists anywhere. A driver without
    // the query (never seen): unknown, so behave as before and restore.
    void* drv = dlopen("libcuda.so.1", RTLD_NOW | RTLD_NOLOAD);
    if (drv) dlclose(drv);
    return drv != nullptr;
  }
  DriverDevice dev = 0;
  unsigned flags = 0;
  int active = 0;
  if (g_driver.device_get.load()(&dev, device) != 0) return false;  // driver not initialised
  if (g_driver.ctx_state.load()(dev, &flags, &active) != 0) return true;
  return active != 0;
}

void clear_own_error(const Runtime* rt, Error err) {
  if (!rt || err == kSuccess) return;
  if (rt->PeekAtLastError && rt->PeekAtLastError() != err) return;
  rt->GetLastError();
}

DeviceGuard::DeviceGuard(const Runtime* rt, int device) : rt_(rt) {
  int current = -1;
  Error err = (rt_ && device >= 0) ? rt_->GetDevice(&current) : kSuccess;
  if (!rt_ || device < 0 || err != kSuccess) {
    clear_own_error(rt_, err);
    rt_ = nullptr;
    return;
  }
  if (current == device) return;
  err = rt_->SetDevice(device);
  if (err == kSuccess) {
    previous_ = current;
  } else {
    clear_own_error(rt_, err);
  }
}

DeviceGuard::~DeviceGuard() {
  if (!rt_ || previous_ < 0) return;
  // The device stays current when the previous one has no context: making it
  // current again would create one (see the header).
  if (!has_primary_context(rt_, previous_)) return;
  clear_own_error(rt_, rt_->SetDevice(previous_));
}

}  // namespace cuda
}  // namespace torchmem
