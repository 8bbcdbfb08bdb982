#include "clock.hpp"

#include <ctime>
#include <fstream>
#include <string>

#if defined(__x86_64__)
#include <x86intrin.h>
#endif

namespace torchmem {

namespace {
int64_t clock_ns(clockid_t id) {
  timespec t;
  clock_gettime(id, &t);
  return int64_t{t.tv_sec} * 1000000000 + t.tv_nsec;
}

#if defined(__x86_64__)
bool tsc_is_invariant() {
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.compare(0, 5, "flags") == 0)
      return line.find(" constant_tsc") != std::string::npos &&
             line.find(" nonstop_tsc") != std::string::npos;
  }
  return false;
}

// Ticks per ns, measured once per process over ~2 ms.
double calibrate_ns_per_tick() {
  static const double ratio = [] {
    int64_t t0 = clock_ns(CLOCK_MONOTONIC);
    uint64_t c0 = __rdtsc();
    int64_t t1;
    do t1 = clock_ns(CLOCK_MONOTONIC); while (t1 - t0 < 2000000);
    uint64_t c1 = __rdtsc();
    return c1 > c0 ? double(t1 - t0) / double(c1 - c0) : 0.0;
  }();
  return ratio;
}
#endif
}  // namespace

Clock::Clock() : wall_offset_ns_(clock_ns(CLOCK_REALTIME) - clock_ns(CLOCK_MONOTONIC)) {
#if defined(__x86_64__)
  static const bool invariant = tsc_is_invariant();
  if (invariant) {
    ns_per_tick_ = calibrate_ns_per_tick();
    use_tsc_ = ns_per_tick_ > 0;
    reanchor_ticks_ = use_tsc_ ? uint64_t(50e6 / ns_per_tick_) : 0;
  }
#endif
  read_slow();
}

int64_t Clock::read_slow() {
  anchor_ns_ = clock_ns(CLOCK_MONOTONIC);
#if defined(__x86_64__)
  if (use_tsc_) anchor_tsc_ = __rdtsc();
#endif
  return anchor_ns_ + wall_offset_ns_;
}

int64_t Clock::now_ns() {
#if defined(__x86_64__)
  if (use_tsc_) {
    uint64_t ticks = __rdtsc() - anchor_tsc_;
    if (ticks < reanchor_ticks_)
      return anchor_ns_ + static_cast<int64_t>(double(ticks) * ns_per_tick_) + wall_offset_ns_;
  }
#endif
  return read_slow();
}

}  // namespace torchmem
