// Event timestamps: wall-clock nanoseconds (time.time_ns scale) at the cost
// of an rdtsc where the TSC is invariant.
//
// clock_gettime through the vDSO costs 30-45 ns on the VMs we measured,
// a third of the whole native cost of an allocation; rdtsc costs about 12.
// The TSC is scaled to ns from a one-time calibration and re-anchored to
// CLOCK_MONOTONIC every ~50 ms, so drift stays in the microseconds. Without
// an invariant TSC (or off x86) it falls back to clock_gettime.
#pragma once

#include <cstdint>

namespace torchmem {

class Clock {
 public:
  Clock();
  // Not thread safe: the recorder calls it under its lock.
  int64_t now_ns();

 private:
  int64_t read_slow();
  bool use_tsc_ = false;
  double ns_per_tick_ = 0;
  uint64_t anchor_tsc_ = 0;
  int64_t anchor_ns_ = 0;
  uint64_t reanchor_ticks_ = 0;
  int64_t wall_offset_ns_ = 0;  // realtime - monotonic, fixed at start
};

}  // namespace torchmem
