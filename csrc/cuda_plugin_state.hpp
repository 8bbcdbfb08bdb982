// The CUDA plugin's process-wide state, shared by its entry points
// (cuda_plugin.cpp) and its counters and controls (cuda_plugin_stats.cpp).
// Internal: nothing outside the plugin includes this.
//
// Every piece of state is immortal (allocated, never destroyed): torch frees
// its last blocks (cuBLAS workspaces held by C++ statics) during static
// destruction at exit, possibly after this library's destructors would have
// run.
#pragma once

#include <atomic>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_plugin.hpp"
#include "live_map.hpp"
#include "recorder.hpp"
#include "spin_lock.hpp"

namespace torchmem {
namespace plugin {

// A stream record_stream added to a block, and the device it belongs to
// (-1 when torch's C-function interface did not say).
struct UseStream {
  uint64_t stream;
  int device;
};

// What the plugin knows about a live block. `backend` is the one that made
// it: a block is always returned to its own backend.
struct Block {
  uint64_t size = 0;
  uint64_t stream = 0;
  std::vector<UseStream>* extra_streams = nullptr;  // record_stream; rare
  Backend* backend = nullptr;
  int16_t device = 0;
  uint8_t captured = 0;  // allocated on a stream a CUDA graph was capturing
  uint8_t deferred = 0;  // freed during a capture; really freed after it
};

// Slot kMaxDevices collects devices outside [0, kMaxDevices).
inline int slot(int device) { return (device >= 0 && device < kMaxDevices) ? device : kMaxDevices; }

// Cumulative totals, kept per shard under the shard's lock (plain adds, no
// atomics) and summed when read. A block's alloc and free hit one shard.
struct ShardTotals {
  uint64_t allocated = 0, freed = 0, alloc_count = 0, free_count = 0;
};

// The pointer map is sharded so threads allocating at once (data loader
// pin threads, autograd's device threads, the main thread) rarely meet.
constexpr int kShards = 32;
struct alignas(64) Shard {
  SpinLock mu;
  AddressTable<Block> table;
  ShardTotals totals[kMaxDevices + 1];
};
extern Shard* const g_shards;

inline Shard& shard_for(uint64_t address) {
  return g_shards[(hash_address(address) >> 40) & (kShards - 1)];
}

// What needs one value across threads: live bytes and blocks (for the peaks
// and the memory-fraction limit), and the rare events.
struct alignas(64) DeviceState {
  std::atomic<uint64_t> current{0}, peak{0};
  std::atomic<uint64_t> blocks{0}, peak_blocks{0};
  std::atomic<uint64_t> oom_count{0}, retry_count{0};
  std::atomic<uint64_t> cap{0};  // memory-fraction limit in bytes; 0 = none
  std::atomic<double> fraction{1.0};
  std::atomic<bool> used{false};  // has had an allocation (empty_cache visits it)
  // Subtracted from the cumulative counters: what reset_accumulated zeroes.
  std::atomic<uint64_t> base_allocated{0}, base_freed{0}, base_alloc_count{0},
      base_free_count{0}, base_oom_count{0}, base_retry_count{0};

  static void raise_peak(std::atomic<uint64_t>& peak_of, uint64_t now) {
    uint64_t p = peak_of.load(std::memory_order_relaxed);
    while (now > p && !peak_of.compare_exchange_weak(p, now, std::memory_order_relaxed)) {
    }
  }
  void add(uint64_t size) {
    raise_peak(peak, current.fetch_add(size, std::memory_order_relaxed) + size);
    raise_peak(peak_blocks, blocks.fetch_add(1, std::memory_order_relaxed) + 1);
  }
  void remove(uint64_t size) {
    current.fetch_sub(size, std::memory_order_relaxed);
    blocks.fetch_sub(1, std::memory_order_relaxed);
  }
};
extern DeviceState g_devices[kMaxDevices + 1];

inline DeviceState& state_for(int device) { return g_devices[slot(device)]; }

// Sum of the shard totals of a device slot (-1: every slot).
ShardTotals sum_totals(int device_slot);

extern std::atomic<Backend*> g_backend;
extern std::mutex g_backend_mu;
extern std::string& g_backend_error;  // why the default backend could not start
extern std::atomic<uint64_t> g_unknown_frees;
extern std::atomic<uint64_t> g_deferred;   // blocks waiting for a capture to end
extern std::atomic<uint64_t> g_unfenced;   // blocks kept because their free could not be ordered
extern std::mutex g_oom_mu;
extern std::string& g_last_oom;

// The backend the next allocation uses, started on first use.
Backend* backend();
// A backend by name (async, sync, host, fake); null with `why`.
Backend* backend_by_name(const std::string& name, std::string* why);

// Where this thread's last failed call says why (torchmem_cuda_last_message).
void set_last_message(const std::string& text);

uint64_t total_live_blocks();

}  // namespace plugin
}  // namespace torchmem
