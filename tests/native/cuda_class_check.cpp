// Runs torchmem's compiled CUDA allocator class (src/torchmem/_hook/
// cuda_allocator.cpp, built against torch 2.11's CUDA 13 wheel by
// scripts/check_cuda_build.sh) on a machine without a GPU, through torch's
// own entry points (c10::cuda::CUDACachingAllocator::*, c10::GetAllocator,
// c10::getDeviceAllocator: what torch.cuda, torch.accelerator and C++ callers
// use), over a fake table of torchmem._native entry points with known
// answers. It checks the translation the class adds: the statistics' fields,
// the snapshot's segments and block states, cacheInfo, the refusals and
// their messages, and the registration; and the trace tracker
// (cuda_trace_tracker.cpp) attached to the class, forwarding the entries of
// its frees. Every path that needs a CUDA device
// (allocate, the end of a capture) is left to tests/gpu.
//
//   built and run by scripts/check_cuda_build.sh; exit 0 and "ok" lines.
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_hook_api.h"

extern "C" int torchmem_cuda_hook_attach(const void* table);
extern "C" int torchmem_cuda_allocator_install(char* err, size_t len);
extern "C" int torchmem_cuda_allocator_active(void);
extern "C" int torchmem_cuda_tracker_attach(char* err, size_t len);

namespace {

namespace CCA = c10::cuda::CUDACachingAllocator;

int g_failures = 0;
#define CHECK(cond)                                                        \
  do {                                                                     \
    if (!(cond)) {                                                         \
      std::fprintf(stderr, "FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond); \
      ++g_failures;                                                        \
    }                                                                      \
  } while (0)

// What the fake table was asked, and what it answers.
struct Calls {
  int init_count = -1, reset_peak = -2, reset_accumulated = -2, empty_cache = 0;
  double fraction = -1.0;
  int fraction_device = -2;
  std::vector<void*> freed;
  std::vector<std::vector<uint64_t>> trace;  // action, device, address, size, stream
} g_calls;
std::string g_message;

constexpr uint64_t kStat(int i) { return 1000 + 17 * static_cast<uint64_t>(i); }

int fake_stats(int, uint64_t* out, int len) {
  for (int i = 0; i < len; ++i) out[i] = kStat(i);
  return len;
}
size_t fake_live_blocks(TorchmemBlock* out, size_t capacity) {
  const TorchmemBlock blocks[] = {
      {0x1000, 4096, 0xA, 0, 0},                        // an ordinary block
      {0x9000, 3u << 20, 0xB, 0, TORCHMEM_ALLOC_CAPTURED},  // made during a capture
      {0x800000, 512, 0xA, 1, 2},                       // freed during a capture, pending
  };
  const size_t n = sizeof(blocks) / sizeof(blocks[0]);
  for (size_t i = 0; out && i < n && i < capacity; ++i) out[i] = blocks[i];
  return n;
}
size_t fake_last_message(char* buf, size_t len) {
  if (buf && len) {
    size_t n = std::min(len - 1, g_message.size());
    std::memcpy(buf, g_message.data(), n);
    buf[n] = '\0';
  }
  return g_message.size();
}

TorchmemCudaHookApi make_table() {
  TorchmemCudaHookApi t{};
  t.version = TORCHMEM_CUDA_HOOK_API_VERSION;
  t.size = sizeof(TorchmemCudaHookApi);
  t.alloc = [](void**, size_t, int, void*, unsigned) { return TORCHMEM_ALLOC_ERROR; };
  t.free = [](void* p) { g_calls.freed.push_back(p); };
  t.record_stream = [](void*, void*, int) {};
  t.init = [](int n) { g_calls.init_count = n; };
  t.empty_cache = [] { ++g_calls.empty_cache; };
  t.set_memory_fraction = [](double f, int d) {
    g_calls.fraction = f;
    g_calls.fraction_device = d;
  };
  t.memory_fraction = [](int) { return 0.25; };
  t.largest_free_block = [](int device) { return static_cast<uint64_t>(12345 + device); };
  t.base_allocation = [](void* p, size_t* size) {
    *size = 77;
    return p;
  };
  t.stats = &fake_stats;
  t.reset_peak = [](int d) { g_calls.reset_peak = d; };
  t.reset_accumulated = [](int d) { g_calls.reset_accumulated = d; };
  t.live_blocks = &fake_live_blocks;
  t.capture_begin = [](int) {
    g_message = "the fake backend refuses capture: use gpu_source='tracker'";
    return -1;
  };
  t.capture_end = [](int, void*) {};
  t.enable_peer_access = [](int, int) {
    g_message = "no peer access here";
    return -1;
  };
  t.mem_info = [](int, uint64_t* f, uint64_t* tot) {
    *f = 1;
    *tot = 2;
    return 0;
  };
  t.last_message = &fake_last_message;
  t.backend_name = [] { return "fake"; };
  t.trace_event = [](int action, int device, uint64_t address, uint64_t size, uint64_t stream) {
    g_calls.trace.push_back({static_cast<uint64_t>(action), static_cast<uint64_t>(device),
                             address, size, stream});
  };
  t.stash_stack = [] {};
  t.pinned_alloc = [](void*, size_t) { return 0; };
  t.pinned_free = [](void*) {};
  return t;
}

// Prints the section's result: ok, or FAILED when a CHECK of it failed.
void section(const char* name) {
  static int failures_before = 0;
  std::printf("%s %s\n", g_failures == failures_before ? "ok     " : "FAILED ", name);
  failures_before = g_failures;
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const c10::Error& e) {
    return e.what_without_backtrace();
  }
  return "";
}

void check_stat(const c10::CachingDeviceAllocator::Stat& s, int current, int peak, int allocated,
                int freed) {
  CHECK(s.current == static_cast<int64_t>(kStat(current)));
  CHECK(s.peak == static_cast<int64_t>(kStat(peak)));
  CHECK(s.allocated == (allocated < 0 ? 0 : static_cast<int64_t>(kStat(allocated))));
  CHECK(s.freed == (freed < 0 ? 0 : static_cast<int64_t>(kStat(freed))));
}

}  // namespace

int main() {
  static const TorchmemCudaHookApi table = make_table();
  CHECK(torchmem_cuda_hook_attach(&table) == 0);
  TorchmemCudaHookApi wrong = table;
  wrong.version += 1;
  CHECK(torchmem_cuda_hook_attach(&wrong) == -1);  // another layout is refused

  // -- registration: torch.cuda's allocator, c10::GetAllocator(kCUDA) and
  //    torch.accelerator's device allocator are all the class.
  char err[256] = "";
  CHECK(torchmem_cuda_allocator_install(err, sizeof err) == 0);
  CHECK(torchmem_cuda_allocator_active() == 1);
  CCA::CUDAAllocator* mine = CCA::get();
  CHECK(mine->name() == "torchmem");
  CHECK(c10::GetAllocator(c10::DeviceType::CUDA) == mine);
  CHECK(c10::getDeviceAllocator(c10::DeviceType::CUDA) == mine);
  CHECK(torchmem_cuda_allocator_install(err, sizeof err) == 0);  // again: a no-op
  section("registration (torch.cuda, GetAllocator(kCUDA), torch.accelerator)");

  mine->init(3);
  CHECK(g_calls.init_count == 3 && mine->initialized());

  // -- getDeviceStats: the plugin's counters in torch's fields (the layout of
  //    torchmem_plugin_stats: current peak allocated freed alloc_count
  //    free_count oom retry reserved reserved_peak live_blocks unknown
  //    peak_live_blocks ...).
  const auto stats = CCA::getDeviceStats(0);
  constexpr size_t all = static_cast<size_t>(c10::CachingDeviceAllocator::StatType::AGGREGATE);
  for (const auto* bytes : {&stats.allocated_bytes, &stats.active_bytes, &stats.requested_bytes})
    check_stat((*bytes)[all], 0, 1, 2, 3);
  for (const auto* blocks : {&stats.allocation, &stats.active}) check_stat((*blocks)[all], 10, 12, 4, 5);
  check_stat(stats.reserved_bytes[all], 8, 9, -1, -1);
  CHECK(stats.num_ooms == static_cast<int64_t>(kStat(6)));
  CHECK(stats.num_alloc_retries == static_cast<int64_t>(kStat(7)));
  CHECK(stats.max_split_size == -1);
  const auto& via_accelerator = c10::getDeviceAllocator(c10::DeviceType::CUDA)->getDeviceStats(0);
  CHECK(via_accelerator.allocated_bytes[all].current == stats.allocated_bytes[all].current);
  CCA::resetPeakStats(2);
  CCA::resetAccumulatedStats(1);
  CHECK(g_calls.reset_peak == 2 && g_calls.reset_accumulated == 1);
  section("getDeviceStats, reset_peak, reset_accumulated");

  // -- cacheInfo (cuDNN's benchmark workspace sizing) and base allocations.
  size_t largest = 0;
  CCA::cacheInfo(1, &largest);
  CHECK(largest == 12346);
  size_t base_size = 0;
  CHECK(mine->getBaseAllocation(reinterpret_cast<void*>(0x1000), &base_size) ==
        reinterpret_cast<void*>(0x1000));
  CHECK(base_size == 77);
  section("cacheInfo, getBaseAllocation");

  // -- snapshot: a segment per block, the states torch.cuda.memory._snapshot()
  //    names (active_allocated / active_pending_free), a graph pool's own.
  const CCA::SnapshotInfo snap = CCA::snapshot({0, 0}, false);
  CHECK(snap.segments.size() == 3);
  if (snap.segments.size() == 3) {
    const auto& s0 = snap.segments[0];
    CHECK(s0.address == 0x1000 && s0.total_size == 4096 && s0.allocated_size == 4096);
    CHECK(s0.device == 0 && s0.stream == reinterpret_cast<void*>(0xA) && !s0.is_large);
    CHECK(s0.blocks.size() == 1 && s0.blocks[0].allocated && s0.blocks[0].active);
    CHECK(snap.segments[1].is_large && snap.segments[1].total_size == (3u << 20));
    const auto& pending = snap.segments[2];
    CHECK(pending.device == 1 && pending.allocated_size == 0 && pending.active_size == 512);
    CHECK(pending.blocks.size() == 1 && !pending.blocks[0].allocated && pending.blocks[0].active);
  }
  CHECK(snap.config_metadata.last_allocator_settings == "torchmem:fake");
  const CCA::SnapshotInfo graph = CCA::snapshot({1, 7}, false);
  CHECK(graph.segments.size() == 1 && graph.segments[0].address == 0x9000);
  section("snapshot (segments, block states, graph pool)");

  // -- limits and controls.
  CCA::setMemoryFraction(0.5, 1);
  CHECK(g_calls.fraction == 0.5 && g_calls.fraction_device == 1);
  CHECK(error_of([&] { CCA::setMemoryFraction(1.5, 0); }).find("invalid fraction") !=
        std::string::npos);
  CHECK(mine->getMemoryFraction(0) == 0.25);
  CCA::emptyCache();
  CHECK(g_calls.empty_cache == 1);
  CCA::raw_delete(reinterpret_cast<void*>(0x1234));
  CHECK(g_calls.freed.size() == 1 && g_calls.freed[0] == reinterpret_cast<void*>(0x1234));
  mine->raw_deleter()(reinterpret_cast<void*>(0x5678));
  CHECK(g_calls.freed.size() == 2 && g_calls.freed[1] == reinterpret_cast<void*>(0x5678));
  mine->raw_delete(nullptr);
  CHECK(g_calls.freed.size() == 2);  // null is nobody's block
  section("memory fraction, empty_cache, raw_delete");

  // -- refusals: each a c10::Error (a RuntimeError in Python) naming what to use.
  const std::string capture = error_of(
      [&] { mine->beginAllocateToPool(0, {1, 1}, [](cudaStream_t) { return true; }); });
  CHECK(capture.find("gpu_source='tracker'") != std::string::npos);
  const std::string peer = error_of([&] { mine->enablePeerAccess(0, 1); });
  CHECK(peer.find("no peer access here") != std::string::npos);
  for (const std::string& refusal :
       {error_of([&] { mine->createOrIncrefPool(0, {1, 2}, nullptr); }),
        error_of([&] { mine->shareIpcHandle(reinterpret_cast<void*>(0x1000)); }),
        error_of([&] { mine->getCheckpointState(0, {1, 2}); })}) {
    CHECK(refusal.find("torchmem.enable(gpu_source='tracker')") != std::string::npos);
  }
  CHECK(!mine->isHistoryEnabled());
  section("refusals (capture, peer access, MemPool, IPC, checkpoints)");

  // -- the trace tracker (cuda_trace_tracker.cpp) attached to the class,
  //    which tells trackers of its frees as torch's allocator would: each
  //    entry reaches torchmem's table with its action named by torch's enum.
  CHECK(torchmem_cuda_tracker_attach(err, sizeof err) == 0);
  CHECK(torchmem_cuda_tracker_attach(err, sizeof err) == 0);  // once per process
  g_calls.trace.clear();
  CCA::raw_delete(reinterpret_cast<void*>(0x4000));
  const std::vector<std::vector<uint64_t>> expected = {
      {TORCHMEM_TRACE_FREE_COMPLETED, 0, 0x4000, 0, 0},
      {TORCHMEM_TRACE_SEGMENT_FREE, 0, 0x4000, 0, 0}};
  CHECK(g_calls.trace == expected);
  section("trace tracker: attach, entries forwarded with torch's actions");

  if (g_failures) {
    std::fprintf(stderr, "cuda_class_check: %d checks failed\n", g_failures);
    return 1;
  }
  return 0;
}
