// The recorder's lock. Critical sections are a few dozen instructions, so a
// test-and-test-and-set lock costs a third of what pthread_mutex does
// uncontended; under contention it yields the CPU instead of burning it,
// which matters when the holder was preempted on a 2-core machine.
#pragma once

#include <sched.h>

#include <atomic>

namespace torchmem {

class SpinLock {
 public:
  void lock() {
    while (flag_.exchange(true, std::memory_order_acquire)) {
      for (int spins = 0; flag_.load(std::memory_order_relaxed); ++spins) {
        if (spins < 64) {
#if defined(__x86_64__)
          __builtin_ia32_pause();
#endif
        } else {
          sched_yield();
        }
      }
    }
  }
  void unlock() { flag_.store(false, std::memory_order_release); }

 private:
  std::atomic<bool> flag_{false};
};

}  // namespace torchmem
