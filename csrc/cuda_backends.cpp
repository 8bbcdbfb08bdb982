// The plugin's test backends, host (malloc, for CPU tests) and fake (logs its
// calls and fails on demand, for tests of ordering, capture and out of
// memory), and the fake's controls. The CUDA backends: cuda_backends_cuda.cpp.
//
// Each backend is a process-lifetime singleton: blocks allocated by one must
// be freed by it even after the plugin has moved on to another.
#include <atomic>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <mutex>

#include "cuda_plugin.hpp"

namespace torchmem {
namespace plugin {
namespace {

class HostBackend final : public Backend {
 public:
  const char* name() const override { return "host"; }
  AllocStatus allocate(void** out, size_t size, int, void*) override {
    *out = std::malloc(size);
    return *out ? AllocStatus::Ok : AllocStatus::OutOfMemory;
  }
  void deallocate(void* ptr, size_t, int, void*) override { std::free(ptr); }
  bool fence(int, void*, void*) override { return true; }
  bool sync_stream(int, void*) override { return true; }
  void release_cache(int) override {}
  bool mem_info(int, uint64_t*, uint64_t*) override { return false; }
};

// Takes one from a "fail the next n" counter; true when this call must fail.
bool take_failure(std::atomic<int>& left_counter) {
  int left = left_counter.load();
  while (left > 0) {
    if (left_counter.compare_exchange_weak(left, left - 1)) return true;
  }
  return false;
}

class FakeBackend final : public Backend {
 public:
  const char* name() const override { return "fake"; }

  AllocStatus allocate(void** out, size_t size, int device, void* stream) override {
    bool fail = take_failure(fail_next_);
    // Synthetic addresses, never reused: the fake never touches memory, and
    // distinct addresses keep the plugin's map and the recorder exact.
    uint64_t addr = 0;
    if (!fail) addr = kBase + next_.fetch_add(1) * kStride;
    char line[160];
    std::snprintf(line, sizeof line, "malloc size=%zu device=%d stream=%" PRIu64 " -> %s",
                  size, device, reinterpret_cast<uint64_t>(stream), fail ? "oom" : "ok");
    log(line);
    if (fail) return AllocStatus::OutOfMemory;
    *out = reinterpret_cast<void*>(addr);
    return AllocStatus::Ok;
  }
  void deallocate(void* ptr, size_t size, int device, void* stream) override {
    char line[160];
    std::snprintf(line, sizeof line, "free ptr=0x%" PRIx64 " size=%zu device=%d stream=%" PRIu64,
                  reinterpret_cast<uint64_t>(ptr), size, device,
                  reinterpret_cast<uint64_t>(stream));
    log(line);
  }
  bool fence(int device, void* user, void* waiter) override {
    bool fail = take_failure(fail_fences_);
    char line[160];
    std::snprintf(line, sizeof line, "fence device=%d user=%" PRIu64 " waiter=%" PRIu64 "%s",
                  device, reinterpret_cast<uint64_t>(user), reinterpret_cast<uint64_t>(waiter),
                  fail ? " -> error" : "");
    log(line);
    return !fail;
  }
  bool sync_stream(int device, void* stream) override {
    bool fail = take_failure(fail_syncs_);
    char line[128];
    std::snprintf(line, sizeof line, "sync device=%d stream=%" PRIu64 "%s", device,
                  reinterpret_cast<uint64_t>(stream), fail ? " -> error" : "");
    log(line);
    return !fail;
  }
  // One synthetic stream per device (kUnifying + device), created (logged)
  // on first use like the CUDA backend's.
  void* unifying_stream(int device) override {
    int d = (device >= 0 && device < kMaxDevices) ? device : kMaxDevices;
    if (!created_[d].exchange(true)) {
      char line[96];
      std::snprintf(line, sizeof line, "create_stream device=%d -> %" PRIu64, device,
                    kUnifying + static_cast<uint64_t>(d));
      log(line);
    }
    return reinterpret_cast<void*>(kUnifying + static_cast<uint64_t>(d));
  }
  bool supports_capture(std::string* why) const override {
    if (capture_.load()) return true;
    *why = "fake backend set to refuse capture";
    return false;
  }
  bool enable_peer_access(int device, int peer, std::string*) override {
    char line[96];
    std::snprintf(line, sizeof line, "peer_access device=%d peer=%d", device, peer);
    log(line);
    return true;
  }
  void release_cache(int device) override {
    char line[64];
    std::snprintf(line, sizeof line, "release_cache device=%d", device);
    log(line);
  }
  bool mem_info(int, uint64_t* free_bytes, uint64_t* total_bytes) override {
    *free_bytes = free_.load();
    *total_bytes = total_.load();
    return *total_bytes != 0;
  }

  std::vector<std::string> log_copy() {
    std::lock_guard<std::mutex> lock(mu_);
    return log_;
  }
  // Forgets the log and the unifying streams made (so each test sees its
  // own first use).
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    log_.clear();
    for (auto& c : created_) c.store(false);
  }
  void fail_next(int n) { fail_next_.store(n < 0 ? 0 : n); }
  void fail_fences(int n) { fail_fences_.store(n < 0 ? 0 : n); }
  void fail_syncs(int n) { fail_syncs_.store(n < 0 ? 0 : n); }
  void set_capture(bool on) { capture_.store(on); }
  void set_mem_info(uint64_t f, uint64_t t) {
    free_.store(f);
    total_.store(t);
  }

 private:
  static constexpr uint64_t kBase = 0x7e0000000000ULL;
  static constexpr uint64_t kStride = 0x100000ULL;  // 1 MiB apart
  static constexpr uint64_t kUnifying = 0xf000;     // streams 0xf000 + device
  void log(const char* line) {
    std::lock_guard<std::mutex> lock(mu_);
    // Bounded so a benchmark run through the fake cannot exhaust memory.
    if (log_.size() < 100000) log_.emplace_back(line);
  }
  std::mutex mu_;
  std::vector<std::string> log_;
  std::atomic<int> fail_next_{0}, fail_fences_{0}, fail_syncs_{0};
  std::atomic<bool> capture_{true};
  std::atomic<bool> created_[kMaxDevices + 1] = {};
  std::atomic<uint64_t> next_{0};
  std::atomic<uint64_t> free_{0};
  std::atomic<uint64_t> total_{0};
};

FakeBackend* fake() {
  // Immortal: blocks may come back during static destruction at exit.
  static FakeBackend* backend = new FakeBackend;
  return backend;
}

}  // namespace

Backend* make_host_backend() {
  // Immortal: blocks may come back during static destruction at exit.
  static HostBackend* backend = new HostBackend;
  return backend;
}

Backend* make_fake_backend() { return fake(); }

std::vector<std::string> fake_log() { return fake()->log_copy(); }
void fake_clear_log() { fake()->clear(); }
void fake_fail_next(int count) { fake()->fail_next(count); }
void fake_fail_fences(int count) { fake()->fail_fences(count); }
void fake_fail_syncs(int count) { fake()->fail_syncs(count); }
void fake_set_capture(bool supported) { fake()->set_capture(supported); }
void fake_set_mem_info(uint64_t free_bytes, uint64_t total_bytes) {
  fake()->set_mem_info(free_bytes, total_bytes);
}

}  // namespace plugin
}  // namespace torchmem
