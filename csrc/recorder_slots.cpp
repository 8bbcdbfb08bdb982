// The process-wide recorders the allocator hooks feed: the CUDA plugin's
// (gpu_recorder) and the CPU allocator hook's (host_recorder).
#include <algorithm>
#include <atomic>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "recorder.hpp"

namespace torchmem {

namespace {
// Never destroyed: torch frees its last blocks (cuBLAS workspaces, CPU
// storages) during interpreter teardown, after static destructors may have
// run, and the allocator hooks may still reach the recorder then.
struct RecorderSlot {
  std::mutex mu;
  std::vector<std::shared_ptr<Recorder>> owners;  // every recorder ever set
  std::atomic<Recorder*> current{nullptr};
  // The owners' raw pointers, newest first, replaced whole on each set() so
  // readers need no lock (old lists are kept: a reader may still be in one).
  std::atomic<const std::vector<Recorder*>*> all{empty_list()};
  std::vector<std::unique_ptr<std::vector<Recorder*>>> lists;  // every list published

  static const std::vector<Recorder*>* empty_list() {
    static const auto* empty = new std::vector<Recorder*>();
    return empty;
  }

  void set(std::shared_ptr<Recorder> recorder) {
    // Old recorders stay owned until process exit: an allocator call racing
    // with the swap may still hold the raw pointer.
    std::lock_guard<std::mutex> lock(mu);
    Recorder* raw = recorder.get();
    if (recorder &&
        std::find(owners.begin(), owners.end(), recorder) == owners.end()) {
      owners.push_back(std::move(recorder));
      lists.push_back(std::make_unique<std::vector<Recorder*>>());
      for (auto it = owners.rbegin(); it != owners.rend(); ++it)
        lists.back()->push_back(it->get());
      all.store(lists.back().get(), std::memory_order_release);
    }
    current.store(raw, std::memory_order_release);
  }

  // In a forked child (one thread): nothing is fed any more. The parent's
  // recorders are dropped from the lists for good (leaked, not destroyed):
  // their copies' locks may have been held by other parent threads at the
  // fork. `mu` itself may have been held too, so it is made anew.
  void forget() {
    current.store(nullptr, std::memory_order_release);
    all.store(empty_list(), std::memory_order_release);
    new (&mu) std::mutex();
    static auto* kept_owners = new std::vector<std::shared_ptr<Recorder>>();
    static auto* kept_lists = new std::vector<std::unique_ptr<std::vector<Recorder*>>>();
    for (auto& o : owners) kept_owners->push_back(std::move(o));
    for (auto& l : lists) kept_lists->push_back(std::move(l));
    owners.clear();
    lists.clear();
  }
};
RecorderSlot& gpu_slot() {
  static auto* slot = new RecorderSlot();
  return *slot;
}
RecorderSlot& host_slot() {
  static auto* slot = new RecorderSlot();
  return *slot;
}
}  // namespace

Recorder* gpu_recorder() { return gpu_slot().current.load(std::memory_order_acquire); }
void set_gpu_recorder(std::shared_ptr<Recorder> recorder) { gpu_slot().set(std::move(recorder)); }

Recorder* host_recorder() { return host_slot().current.load(std::memory_order_acquire); }
void set_host_recorder(std::shared_ptr<Recorder> recorder) {
  host_slot().set(std::move(recorder));
}
void forget_host_recorders() { host_slot().forget(); }

bool record_host_free(uint64_t address) {
  RecorderSlot& slot = host_slot();
  Recorder* first = slot.current.load(std::memory_order_acquire);
  if (first && first->record_free_if_live(address)) return true;
  // Recorded by a recorder fed before the current one: its free belongs there.
  for (Recorder* r : *slot.all.load(std::memory_order_acquire))
    if (r != first && r->record_free_if_live(address)) return true;
  return false;
}

}  // namespace torchmem
