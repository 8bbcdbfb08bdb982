// Python bindings of the CUDA plugin's controls and counters. The entry
// points torch calls are plain C functions (cuda_plugin.hpp); these are for
// torchmem.cuda and for tests. Wired into the module by module.cpp calling
// bind_cuda(m) inside NB_MODULE.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <cstdint>
#include <string>

#include "cuda_plugin.hpp"
#include "cuda_runtime.hpp"

namespace nb = nanobind;

namespace {

const char* const kStatNames[] = {
    "current", "peak", "allocated", "freed", "alloc_count", "free_count",
    "oom_count", "retry_count", "reserved", "reserved_peak", "live_blocks",
    "unknown_frees", "peak_live_blocks", "deferred_frees", "unfenced_blocks", "limit"};
static_assert(sizeof(kStatNames) / sizeof(kStatNames[0]) == torchmem::plugin::kStatCount,
              "one name per DeviceCounters field");
using torchmem::plugin::kStatCount;

nb::dict stats(int device) {
  uint64_t values[kStatCount] = {};
  int n = torchmem_plugin_stats(device, values, kStatCount);
  nb::dict d;
  for (int i = 0; i < n; ++i) d[kStatNames[i]] = values[i];
  return d;
}

uintptr_t address_of(void* fn) { return reinterpret_cast<uintptr_t>(fn); }

}  // namespace

void bind_cuda(nb::module_& m) {
  m.def("cuda_set_backend", [](const std::string& name) {
    return torchmem_plugin_set_backend(name.c_str());
  }, nb::arg("name"),
  "Selects the plugin backend: 0 ok, -1 unknown name, -2 blocks of another "
  "backend still live, -3 cannot start here (see cuda_runtime_description).");
  m.def("cuda_backend", [] { return std::string(torchmem_plugin_backend()); },
        "Name of the backend in use ('' before the first allocation).");
  m.def("cuda_plugin_stats", &stats, nb::arg("device"),
        "The plugin's counters for a device (-1: all), bytes and counts.");
  m.def("cuda_reset_peak", &torchmem_plugin_reset_peak, nb::arg("device"),
        "Peak := current for a device (-1: all), pool high-water mark too.");
  m.def("cuda_empty_cache", [] { torchmem_reset(); },
        "Returns the backend's cached memory to the driver (torch.cuda.empty_cache).");
  m.def("cuda_live_blocks", &torchmem_plugin_live_blocks);
  m.def("cuda_runtime_description", [] { return torchmem::cuda::runtime_description(); },
        "Which libcudart the plugin resolved, or why none was found.");
  m.def("cuda_set_oom_throws", [](bool on) { torchmem_plugin_set_oom_throws(on ? 1 : 0); },
        nb::arg("on"),
        "Whether a final out-of-memory throws (torch) or returns null (ctypes tests).");
  m.def("cuda_last_oom_message", [] {
    size_t n = torchmem_plugin_last_oom_message(nullptr, 0);
    std::string s(n + 1, '\0');
    torchmem_plugin_last_oom_message(&s[0], s.size());
    s.resize(n);
    return s;
  });
  m.def("cuda_fake_log", &torchmem::plugin::fake_log);
  m.def("cuda_fake_clear", &torchmem::plugin::fake_clear_log);
  m.def("cuda_fake_fail_next", &torchmem::plugin::fake_fail_next, nb::arg("count"));
  m.def("cuda_fake_set_mem_info", &torchmem::plugin::fake_set_mem_info,
        nb::arg("free_bytes"), nb::arg("total_bytes"));
  m.def("cuda_plugin_bench", [](uint64_t n, uint64_t batch) {
    nb::gil_scoped_release release;
    return batch ? torchmem_plugin_bench_batched(n, batch) : torchmem_plugin_bench(n);
  }, nb::arg("n"), nb::arg("batch") = 0,
  "n malloc+free pairs through the entry points; elapsed ns.");
  // Calls the entry points from C++ so a C++ exception (the OOM error torch
  // would see) reaches Python as RuntimeError: the CPU test of the throw path.
  m.def("cuda_test_malloc", [](size_t size, int device, uint64_t stream) {
    nb::gil_scoped_release release;
    return reinterpret_cast<uintptr_t>(
        torchmem_malloc(size, device, reinterpret_cast<void*>(stream)));
  }, nb::arg("size"), nb::arg("device"), nb::arg("stream"));
  m.def("cuda_test_free", [](uintptr_t ptr, size_t size, int device, uint64_t stream) {
    nb::gil_scoped_release release;
    torchmem_free(reinterpret_cast<void*>(ptr), size, device, reinterpret_cast<void*>(stream));
  }, nb::arg("ptr"), nb::arg("size"), nb::arg("device"), nb::arg("stream"));
  m.def("cuda_hook_api_address", [] { return address_of(const_cast<void*>(torchmem_cuda_hook_api())); },
        "Address of the entry-point table the run-time-built CUDA library is given.");
  m.def("cuda_hook_addresses", [] {
    nb::dict d;
    d["malloc"] = address_of(reinterpret_cast<void*>(&torchmem_malloc));
    d["free"] = address_of(reinterpret_cast<void*>(&torchmem_free));
    d["init"] = address_of(reinterpret_cast<void*>(&torchmem_init));
    d["reset"] = address_of(reinterpret_cast<void*>(&torchmem_reset));
    d["memory_fraction"] = address_of(reinterpret_cast<void*>(&torchmem_set_memory_fraction));
    d["base_alloc"] = address_of(reinterpret_cast<void*>(&torchmem_base_alloc));
    d["record_stream"] = address_of(reinterpret_cast<void*>(&torchmem_record_stream));
    return d;
  }, "Addresses of the exported entry points (what ctypes would find).");
}
