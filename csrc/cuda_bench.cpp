// Native benchmark loops and the fake backend's C controls: plain C entry
// points over the plugin's public interface, so a C++ benchmark or ctypes can
// drive the plugin without Python code per call.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>
#include <vector>

#include "../src/torchmem/_hook/cuda_hook_api.h"
#include "cuda_plugin.hpp"
#include "cuda_trace.hpp"

using namespace torchmem::plugin;

extern "C" {

uint64_t torchmem_plugin_bench(uint64_t n) {
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    size_t size = 256 + (i & 7) * 64;
    void* p = torchmem_malloc(size, 0, nullptr);
    torchmem_free(p, size, 0, nullptr);
  }
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
}

uint64_t torchmem_plugin_bench_batched(uint64_t n, uint64_t batch) {
  if (batch == 0) batch = 1;
  std::vector<void*> ptrs(batch);
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t done = 0; done < n;) {
    uint64_t k = std::min(batch, n - done);
    for (uint64_t i = 0; i < k; ++i) ptrs[i] = torchmem_malloc(256 + (i & 7) * 64, 0, nullptr);
    for (uint64_t i = 0; i < k; ++i) torchmem_free(ptrs[i], 256 + (i & 7) * 64, 0, nullptr);
    done += k;
  }
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
}

// The tracker's cost per event pair, on the model of one 64 MiB segment on
// device 63 (a slot tests do not use).
uint64_t torchmem_cuda_trace_bench(uint64_t n) {
  constexpr int kDevice = 63;
  constexpr uint64_t kSegment = 0x7f0000000000ULL;
  torchmem_cuda_trace_event(TORCHMEM_TRACE_SEGMENT_ALLOC, kDevice, kSegment, 64ULL << 20, 0);
  auto t0 = std::chrono::steady_clock::now();
  for (uint64_t i = 0; i < n; ++i) {
    uint64_t addr = kSegment + (i & 1023) * 4096;
    uint64_t size = 256 + (i & 7) * 64;
    torchmem_cuda_trace_event(TORCHMEM_TRACE_ALLOC, kDevice, addr, size, 0);
    torchmem_cuda_trace_event(TORCHMEM_TRACE_FREE_COMPLETED, kDevice, addr, size, 0);
  }
  auto t1 = std::chrono::steady_clock::now();
  torchmem_cuda_trace_event(TORCHMEM_TRACE_SEGMENT_FREE, kDevice, kSegment, 64ULL << 20, 0);
  return std::chrono::duration_cast<std::chrono::nanoseconds>(t1 - t0).count();
}

size_t torchmem_fake_log(char* buf, size_t len) {
  std::string text;
  for (const std::string& line : fake_log()) {
    text += line;
    text += '\n';
  }
  if (buf && len) {
    size_t n = std::min(len - 1, text.size());
    std::memcpy(buf, text.data(), n);
    buf[n] = '\0';
  }
  return text.size();
}

void torchmem_fake_clear(void) { fake_clear_log(); }
void torchmem_fake_fail_next(int count) { fake_fail_next(count); }
void torchmem_fake_fail_fences(int count) { fake_fail_fences(count); }
void torchmem_fake_fail_syncs(int count) { fake_fail_syncs(count); }
void torchmem_fake_set_capture(int supported) { fake_set_capture(supported != 0); }
void torchmem_fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes) {
  fake_set_mem_info(free_bytes, total_bytes);
}

}  // extern "C"
