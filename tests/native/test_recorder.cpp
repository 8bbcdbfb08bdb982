// Native tests of the recorder (and, when built with TORCHMEM_TEST_PLUGIN,
// the CUDA plugin's C entry points on the host and fake backends), with
// exact counter checks. No framework: scripts/sanitize.sh builds this file
// with the sources it needs under -fsanitize=address,undefined and runs it;
// the exit status is the number of failed checks (capped), 0 = all passed.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "context_table.hpp"
#include "event_log.hpp"
#include "recorder.hpp"
#include "trace_format.hpp"
#include "trace_frames.hpp"

#ifdef TORCHMEM_TEST_PLUGIN
#include "cuda_plugin.hpp"
#include "host_bridge.hpp"
#endif

using namespace torchmem;

namespace {

std::atomic<int> g_failures{0};
int g_checks = 0;

#define CHECK(cond)                                                          \
  do {                                                                       \
    ++g_checks;                                                              \
    if (!(cond)) {                                                           \
      ++g_failures;                                                          \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
    }                                                                        \
  } while (0)

#define CHECK_EQ(a, b)                                                          \
  do {                                                                          \
    ++g_checks;                                                                 \
    auto _va = (a);                                                             \
    auto _vb = (b);                                                             \
    if (!(_va == _vb)) {                                                        \
      ++g_failures;                                                             \
      std::fprintf(stderr, "%s:%d: CHECK_EQ failed: %s == %s (%llu vs %llu)\n", \
                   __FILE__, __LINE__, #a, #b, (unsigned long long)_va,        \
                   (unsigned long long)_vb);                                    \
    }                                                                           \
  } while (0)

void check_counters(const Counters& c, uint64_t allocated, uint64_t freed, uint64_t current,
                    uint64_t peak, uint64_t n_alloc, uint64_t n_free, int line) {
  bool ok = c.allocated == allocated && c.freed == freed && c.current == current &&
            c.peak == peak && c.alloc_count == n_alloc && c.free_count == n_free;
  ++g_checks;
  if (!ok) {
    ++g_failures;
    std::fprintf(stderr,
                 "line %d: counters (%llu %llu %llu %llu %llu %llu) != expected "
                 "(%llu %llu %llu %llu %llu %llu)\n",
                 line, (unsigned long long)c.allocated, (unsigned long long)c.freed,
                 (unsigned long long)c.current, (unsigned long long)c.peak,
                 (unsigned long long)c.alloc_count, (unsigned long long)c.free_count,
                 (unsigned long long)allocated, (unsigned long long)freed,
                 (unsigned long long)current, (unsigned long long)peak,
                 (unsigned long long)n_alloc, (unsigned long long)n_free);
  }
}
#define CHECK_COUNTERS(c, ...) check_counters((c), __VA_ARGS__, __LINE__)

uint64_t anomaly(const Recorder& r, AnomalyKind k) {
  return r.anomaly_counts()[static_cast<int>(k)];
}

// -- single-threaded semantics ------------------------------------------------

void test_alloc_free_counters() {
  Recorder r;
  uint16_t gpu = kTypeGPU, cpu = kTypeCPU;
  r.record_alloc(0x1000, 100, cpu, -1, 0, 0);
  r.record_alloc(0x2000, 300, gpu, 0, 7, 0);
  r.record_alloc(0x3000, 50, gpu, 1, 0, 0);
  r.record_free(0x1000, 100);
  r.record_free(0x2000, -1);
  CHECK_COUNTERS(r.total(), 450, 400, 50, 450, 3, 2);
  CHECK_COUNTERS(r.for_type(cpu), 100, 100, 0, 100, 1, 1);
  CHECK_COUNTERS(r.for_type(gpu), 350, 300, 50, 350, 2, 1);
  CHECK_COUNTERS(r.for_device(-1), 100, 100, 0, 100, 1, 1);
  CHECK_COUNTERS(r.for_device(0), 300, 300, 0, 300, 1, 1);
  CHECK_COUNTERS(r.for_device(1), 50, 0, 50, 50, 1, 0);
  CHECK_COUNTERS(r.for_type_device(gpu, 1), 50, 0, 50, 50, 1, 0);
  CHECK_COUNTERS(r.for_device(5), 0, 0, 0, 0, 0, 0);        // never seen
  CHECK_COUNTERS(r.for_type(999), 0, 0, 0, 0, 0, 0);        // out of range
  CHECK_EQ(r.live_count(), 1u);
  LiveEntry e;
  CHECK(r.lookup_live(0x3000, &e));
  CHECK_EQ(e.size, 50u);
  CHECK_EQ(e.device, 1);
  CHECK(!r.lookup_live(0x1000, &e));
  for (uint64_t k : r.anomaly_counts()) CHECK_EQ(k, 0u);

  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  CHECK_EQ(rows.size(), 5u);
  const uint64_t kinds[] = {0, 0, 0, 1, 1};
  const uint64_t sizes[] = {100, 300, 50, 100, 300};
  const uint64_t allocs[] = {100, 400, 450, 450, 450};
  const uint64_t frees[] = {0, 0, 0, 100, 400};
  for (size_t i = 0; i < rows.size() && i < 5; ++i) {
    CHECK_EQ(rows[i].seq, i);
    CHECK_EQ(static_cast<uint64_t>(rows[i].kind), kinds[i]);
    CHECK_EQ(rows[i].size, sizes[i]);
    CHECK_EQ(rows[i].total_allocated, allocs[i]);
    CHECK_EQ(rows[i].total_freed, frees[i]);
    CHECK_EQ(rows[i].thread_id, current_thread_id());
    if (i) CHECK(rows[i].timestamp_ns >= rows[i - 1].timestamp_ns);
  }
  CHECK_EQ(rows[1].stream, 7u);  // stream index expanded back to the value
  CHECK_EQ(rows[4].stream, 7u);  // the free carries the allocation's stream
  r.reset_peak(-1, -2);  // every type, every device
  CHECK_EQ(r.total().peak, 50u);
}

void test_anomalies() {
  Recorder r;
  r.record_free(0x10, 8);                          // unknown
  r.record_alloc(0x20, 64, kTypeCPU, -1, 0, 0);
  r.record_free(0x20, 32);                         // size mismatch: frees 64
  r.record_free(0x20, -1);                         // double
  r.record_alloc(0x30, 10, kTypeCPU, -1, 0, 0);
  r.record_alloc(0x30, 20, kTypeGPU, 0, 0, 0);     // over live: closes the 10
  CHECK_EQ(anomaly(r, AnomalyKind::UnknownFree), 1u);
  CHECK_EQ(anomaly(r, AnomalyKind::SizeMismatch), 1u);
  CHECK_EQ(anomaly(r, AnomalyKind::DoubleFree), 1u);
  CHECK_EQ(anomaly(r, AnomalyKind::AllocOverLive), 1u);
  CHECK_COUNTERS(r.total(), 94, 74, 20, 64, 3, 2);
  CHECK_COUNTERS(r.for_type(kTypeCPU), 74, 74, 0, 64, 2, 2);
  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  CHECK_EQ(rows.size(), 5u);  // A, D(64), A, D(10), A
  CHECK_EQ(rows[1].size, 64u);
  CHECK_EQ(static_cast<int>(rows[3].kind), 1);
  CHECK_EQ(rows[3].size, 10u);
  CHECK_EQ(rows[3].total_freed, 74u);
  CHECK_EQ(rows[4].total_allocated, 94u);
  std::vector<AnomalyExample> ex = r.anomaly_examples();
  CHECK_EQ(ex.size(), 4u);
  CHECK(ex[1].kind == AnomalyKind::SizeMismatch && ex[1].size == 32 && ex[1].expected == 64);
  CHECK(ex[3].kind == AnomalyKind::AllocOverLive && ex[3].size == 20 && ex[3].expected == 10);
  CHECK_EQ(ex[3].seq, 3u);  // the DEALLOCATION it caused
  // Only the last 8 examples of a kind are kept; counts stay exact.
  for (int i = 0; i < 20; ++i) r.record_free(0x100000 + i * 16, -1);
  CHECK_EQ(anomaly(r, AnomalyKind::UnknownFree), 21u);
  size_t unknown = 0;
  for (const AnomalyExample& e : r.anomaly_examples())
    unknown += e.kind == AnomalyKind::UnknownFree;
  CHECK_EQ(unknown, 8u);
  r.record_anomaly(AnomalyKind::BadArgument, 1, 2, 3);
  CHECK_EQ(anomaly(r, AnomalyKind::BadArgument), 1u);
  // Address 0 and the largest addresses are ordinary keys.
  r.record_alloc(0, 5, kTypeCPU, -1, 0, 0);
  r.record_alloc(UINT64_MAX - 1, 6, kTypeCPU, -1, 0, 0);
  r.record_free(0, 5);
  r.record_free(UINT64_MAX - 1, 6);
  r.record_free(0, 5);
  CHECK_EQ(anomaly(r, AnomalyKind::DoubleFree), 2u);
  CHECK_EQ(r.total().current, 20u);
}

void test_realloc() {
  Recorder r;
  r.record_alloc(0x100, 10, kTypeGPU, 2, 9, 0);
  r.record_realloc(0x100, 0x200, 30, 0);   // moves: inherits GPU, device 2, stream 9
  r.record_realloc(0x999, 0x300, 5, 0);    // unknown old: CPU, -1, 0; counted
  r.record_realloc(0x300, 0x200, 7, 0);    // new over live 0x200: closes the 30
  CHECK_EQ(anomaly(r, AnomalyKind::UnknownFree), 1u);
  CHECK_EQ(anomaly(r, AnomalyKind::AllocOverLive), 1u);
  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  // A(100) D(100) R(200) R(300) D(300) D(200,30) R(200,7)
  const int kinds[] = {0, 1, 2, 2, 1, 1, 2};
  const uint64_t addrs[] = {0x100, 0x100, 0x200, 0x300, 0x300, 0x200, 0x200};
  CHECK_EQ(rows.size(), 7u);
  for (size_t i = 0; i < rows.size() && i < 7; ++i) {
    CHECK_EQ(static_cast<int>(rows[i].kind), kinds[i]);
    CHECK_EQ(rows[i].address, addrs[i]);
  }
  CHECK_EQ(rows[2].device, 2);
  CHECK_EQ(rows[2].type_id, kTypeGPU);
  CHECK_EQ(rows[2].stream, 9u);
  CHECK_EQ(rows[3].type_id, kTypeCPU);
  CHECK_EQ(rows[3].device, -1);
  CHECK_EQ(rows[6].type_id, kTypeCPU);  // inherited from 0x300
  CHECK_COUNTERS(r.total(), 52, 45, 7, 35, 4, 3);
  CHECK_EQ(r.live_count(), 1u);
}

void test_markers_steps_types() {
  Recorder r;
  CHECK_EQ(r.record_marker(EventKind::Snapshot, 0, 0), 0u);
  r.record_alloc(0x10, 8, kTypeCPU, -1, 0, 0);
  CHECK_EQ(r.advance_step(), 1u);
  r.record_alloc(0x20, 8, kTypeCPU, -1, 0, 0);
  CHECK_EQ(r.record_marker(EventKind::GcStart, 5, 0), 3u);
  r.advance_step();
  r.advance_step();
  CHECK_EQ(r.record_marker(EventKind::GcEnd, 5, 8), 4u);
  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  CHECK_EQ(rows.size(), 5u);
  CHECK_EQ(rows[3].type_id, kTypeNone);
  CHECK_EQ(rows[3].address, 5u);
  CHECK_EQ(rows[4].step, 3u);
  CHECK_EQ(rows[4].total_allocated, 16u);  // markers add nothing
  auto range = r.seq_range_for_steps(1, 1);
  CHECK_EQ(range.first, 2u);
  CHECK_EQ(range.second, 4u);
  range = r.seq_range_for_steps(2, 2);
  CHECK_EQ(range.first, range.second);
  CHECK_EQ(r.first_seq_at_or_after_time(-5), 0u);
  CHECK_EQ(r.first_seq_at_or_after_time(INT64_MAX), 5u);
  uint16_t a = r.type_id("arena");
  CHECK_EQ(a, 3);
  CHECK_EQ(r.type_id("arena"), 3);
  CHECK_EQ(r.type_names().size(), 4u);
  r.record_alloc(0x30, 1, a, 3, 0, 0);
  r.record_alloc(0x40, 1, 60000, 3, 0, 0);  // unknown type id -> CPU
  CHECK_COUNTERS(r.for_type(a), 1, 0, 1, 1, 1, 0);
  CHECK_COUNTERS(r.for_type(kTypeCPU), 17, 0, 17, 17, 3, 0);
  r.set_enabled(false);
  r.record_alloc(0x50, 1, kTypeCPU, -1, 0, 0);
  r.record_free(0x10, -1);
  r.record_realloc(0x20, 0x60, 1, 0);
  CHECK_EQ(r.next_seq(), 7u);
  r.set_enabled(true);
  OomInfo info{};
  info.requested = 1 << 20;
  info.device = 0;
  r.record_oom(info, kTypeGPU);
  CHECK_EQ(r.oom_events().size(), 1u);
  CHECK_EQ(r.oom_events()[0].seq, 7u);
  CHECK_EQ(r.total().allocated, 18u);  // an OOM allocates nothing
}

void test_replay() {
  Recorder a;
  a.record_alloc(0x10, 100, kTypeGPU, 0, 3, 0);
  a.record_alloc(0x20, 200, kTypeCPU, -1, 0, 0);
  a.advance_step();
  a.record_realloc(0x10, 0x30, 150, 0);
  a.record_marker(EventKind::Snapshot, 0, 350);
  a.record_free(0x20, -1);
  a.record_free(0x20, -1);  // anomaly: not an event
  std::vector<EventRow> rows = a.read(0, UINT64_MAX);
  Recorder b;
  for (const EventRow& row : rows) b.replay(row);
  std::vector<EventRow> back = b.read(0, UINT64_MAX);
  CHECK_EQ(back.size(), rows.size());
  for (size_t i = 0; i < rows.size() && i < back.size(); ++i) {
    CHECK_EQ(back[i].timestamp_ns, rows[i].timestamp_ns);
    CHECK_EQ(back[i].address, rows[i].address);
    CHECK_EQ(back[i].size, rows[i].size);
    CHECK_EQ(static_cast<int>(back[i].kind), static_cast<int>(rows[i].kind));
    CHECK_EQ(back[i].total_allocated, rows[i].total_allocated);
    CHECK_EQ(back[i].total_freed, rows[i].total_freed);
    CHECK_EQ(back[i].step, rows[i].step);
    CHECK_EQ(back[i].stream, rows[i].stream);
  }
  Counters ta = a.total(), tb = b.total();
  CHECK_COUNTERS(tb, ta.allocated, ta.freed, ta.current, ta.peak, ta.alloc_count,
                 ta.free_count);
  CHECK_EQ(b.step(), 1u);
  CHECK_EQ(b.live_count(), 1u);
  // Garbage rows: unknown kinds, type ids and frees must not crash.
  EventRow junk{};
  for (int k = 0; k < 256; k += 17) {
    junk.kind = static_cast<EventKind>(k);
    junk.type_id = static_cast<uint16_t>(k * 300);
    junk.address = 0xdead0000 + k;
    junk.size = UINT64_MAX - k;
    junk.device = static_cast<int16_t>(-k);
    junk.stream = k;
    b.replay(junk);
  }
  CHECK(b.next_seq() > rows.size());
  // A device below -1 (a corrupt trace row; a bad OOM or plugin call) must not
  // index before the per-device tables. Before the fix in the issue 7 report
  // this wrote out of bounds (ASan: heap-buffer-overflow in slices_slow_locked).
  Recorder c;
  EventRow neg{};
  neg.kind = EventKind::Allocation;
  neg.type_id = kTypeCPU;
  neg.address = 0xbad0;
  neg.size = 4;
  neg.device = -2;
  c.replay(neg);
  neg.kind = EventKind::Deallocation;
  c.replay(neg);
  OomInfo oi{};
  oi.device = -2;
  c.record_oom(oi, kTypeGPU);
  c.record_alloc(0xbad1, 8, kTypeGPU, -7, 0, 0);
  CHECK_EQ(c.total().current, 8u);
  CHECK_EQ(c.total().freed, 4u);
}

void test_eviction() {
  const uint64_t chunk = EventLog::kChunkEvents;
  Recorder r(chunk);  // retention: one chunk
  for (uint64_t i = 0; i < 5 * chunk; ++i) {
    r.record_alloc(0x1000 + (i % 64) * 16, 8, kTypeCPU, -1, 0, 0);
    r.record_free(0x1000 + (i % 64) * 16, 8);
  }
  CHECK_EQ(r.next_seq(), 10 * chunk);
  uint64_t first = r.first_retained_seq();
  CHECK(first > 0 && first % chunk == 0);
  CHECK(r.next_seq() - first <= 2 * chunk);
  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  CHECK_EQ(rows.size(), r.next_seq() - first);
  CHECK_EQ(rows.front().seq, first);
  // Cumulative totals stay exact across evicted chunks.
  CHECK_EQ(rows.back().total_allocated, 5 * chunk * 8);
  CHECK_EQ(rows.back().total_freed, 5 * chunk * 8);
  CHECK_COUNTERS(r.total(), 5 * chunk * 8, 5 * chunk * 8, 0, 8, 5 * chunk, 5 * chunk);
  // A consumer that has read only up to `held` holds the ring there.
  uint64_t held = r.first_retained_seq();
  r.set_consumer_seq(held);
  for (uint64_t i = 0; i < 4 * chunk; ++i) r.record_marker(EventKind::Snapshot, i, 0);
  CHECK(r.first_retained_seq() <= held);
  CHECK_EQ(r.read(held, UINT64_MAX).size(), r.next_seq() - held);
  r.set_consumer_seq(UINT64_MAX);
  for (uint64_t i = 0; i < 2 * chunk; ++i) r.record_marker(EventKind::Snapshot, i, 0);
  CHECK(r.first_retained_seq() > held);
  CHECK(r.memory_bytes() > 0);

  // A read in progress (planned, not yet filled) pins its range: appending
  // far past the retention neither evicts nor reuses its chunks.
  uint64_t from = r.first_retained_seq();
  std::vector<EventRow> pinned;
  {
    Recorder::PinnedRead pin(r, from, UINT64_MAX);
    CHECK_EQ(pin.plan().rows, r.next_seq() - from);
    for (uint64_t i = 0; i < 4 * chunk; ++i) r.record_marker(EventKind::GcStart, 7, 0);
    CHECK_EQ(r.first_retained_seq(), from);
    pinned.resize(pin.plan().rows);
    EventLog::fill(pin.plan(), pinned.data());
  }
  CHECK_EQ(pinned.front().seq, from);
  CHECK_EQ(pinned.back().seq, from + pinned.size() - 1);
  bool snapshots_only = true;
  for (const EventRow& e : pinned) snapshots_only &= e.kind == EventKind::Snapshot;
  CHECK(snapshots_only);
  r.record_marker(EventKind::GcEnd, 7, 0);  // the pin is gone: eviction resumes
  for (uint64_t i = 0; i < 2 * chunk; ++i) r.record_marker(EventKind::GcEnd, 7, 0);
  CHECK(r.first_retained_seq() > from);
}

// -- threads ------------------------------------------------------------------

void test_threads() {
  Recorder r(1 << 16);
  const int kThreads = 8;
  const uint64_t kPairs = 40000;
  std::atomic<bool> stop{false};
  std::atomic<uint64_t> reads{0};
  std::thread reader([&] {
    while (!stop.load()) {
      Counters t = r.total();
      if (t.current > t.allocated) ++g_failures;  // impossible if consistent
      std::vector<EventRow> rows = r.read(r.first_retained_seq(), UINT64_MAX);
      for (size_t i = 1; i < rows.size(); ++i)
        if (rows[i].seq != rows[i - 1].seq + 1 ||
            rows[i].timestamp_ns < rows[i - 1].timestamp_ns)
          ++g_failures;
      (void)r.live();
      (void)r.per_type();
      (void)r.anomaly_examples();
      r.reset_peak(-1, -2);  // every type, every device
      reads.fetch_add(1);
    }
  });
  std::vector<std::thread> workers;
  for (int t = 0; t < kThreads; ++t) {
    workers.emplace_back([&r, t, kPairs] {
      uint16_t type = (t % 2) ? kTypeGPU : r.type_id("thread-type-" + std::to_string(t % 3));
      uint64_t base = static_cast<uint64_t>(t + 1) << 40;
      for (uint64_t i = 0; i < kPairs; ++i) {
        uint64_t a = base + (i % 512) * 64;
        r.record_alloc(a, 64 + t, type, static_cast<int16_t>(t % 4), t, 0);
        if (i % 7 == 0) {
          r.record_realloc(a, a + 32, 32 + t, 0);
          r.record_free(a + 32, 32 + t);
        } else {
          r.record_free(a, 64 + t);
        }
        if (i % 1000 == 0) r.record_marker(EventKind::Snapshot, i, 0);
        if (t == 0 && i % 5000 == 0) r.advance_step();
      }
      r.record_alloc(base, 1000 + t, type, -1, 0, 0);  // one survivor each
    });
  }
  for (auto& w : workers) w.join();
  stop.store(true);
  reader.join();
  uint64_t alloc = 0, freed = 0, survivors = 0;
  uint64_t reallocs = (kPairs + 6) / 7;
  for (int t = 0; t < kThreads; ++t) {
    alloc += kPairs * (64 + t) + reallocs * (32 + t) + 1000 + t;
    freed += kPairs * (64 + t) + reallocs * (32 + t);
    survivors += 1000 + t;
  }
  Counters c = r.total();
  CHECK_EQ(c.allocated, alloc);
  CHECK_EQ(c.freed, freed);
  CHECK_EQ(c.current, survivors);
  CHECK_EQ(c.alloc_count, kThreads * (kPairs + reallocs + 1));
  CHECK_EQ(c.free_count, kThreads * (kPairs + reallocs));
  CHECK_EQ(r.live_count(), static_cast<uint64_t>(kThreads));
  for (uint64_t k : r.anomaly_counts()) CHECK_EQ(k, 0u);
  uint64_t by_types = 0;
  for (auto& [t, tc] : r.per_type()) by_types += tc.current;
  CHECK_EQ(by_types, survivors);
  CHECK(reads.load() > 0);
}

void test_fork_while_busy() {
  // fork() while other threads hold the recorder's lock must not leave the
  // child's copy locked (pthread_atfork handlers in recorder.cpp).
  Recorder r;
  std::atomic<bool> stop{false};
  std::vector<std::thread> busy;
  for (int t = 0; t < 3; ++t)
    busy.emplace_back([&, t] {
      uint64_t i = 0;
      while (!stop.load()) {
        uint64_t a = (static_cast<uint64_t>(t + 1) << 32) + (i++ % 128) * 16;
        r.record_alloc(a, 16, kTypeCPU, -1, 0, 0);
        r.record_free(a, 16);
      }
    });
  int bad_children = 0;
  for (int k = 0; k < 20; ++k) {
    pid_t pid = fork();
    if (pid == 0) {
      alarm(10);  // a deadlock in the child fails instead of hanging
      r.record_alloc(0x77, 1, kTypeCPU, -1, 0, 0);
      Counters c = r.total();
      _exit(c.current >= 1 ? 0 : 3);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) ++bad_children;
  }
  stop.store(true);
  for (auto& t : busy) t.join();
  CHECK_EQ(bad_children, 0);
  CHECK_EQ(r.total().current, 0u);
}

// Column frames (trace_frames.cpp) hold exactly the rows read() gives:
// decoded here from the layout in docs/trace-format.md.
void test_column_frames() {
  Recorder r;
  const uint64_t n = 3 * EventLog::kChunkEvents / 2 + 5;  // two chunks, the second partial
  for (uint64_t i = 0; i < n / 2; ++i) {
    uint64_t stream = (i >= 100 && i < 110) ? 3 + (i & 1) : 0;  // varies in one stretch
    set_current_context(i >= 9000 ? static_cast<uint16_t>(1 + i % 5) : 0);  // so does this
    r.record_alloc(0x1000 + 16 * (i % 64), 16 + (i < 4000 ? 0 : i % 3), kTypeGPU, 0, stream, 0);
    r.record_free(0x1000 + 16 * (i % 64), -1);
  }
  set_current_context(0);
  const uint64_t total = r.next_seq();
  std::vector<EventRow> want = r.read(0, UINT64_MAX);
  FILE* f = std::tmpfile();
  CHECK(f != nullptr);
  if (!f) return;
  const uint64_t start = 7;
  uint64_t sent = 0;
  CHECK_EQ(write_column_frames(r, fileno(f), 'K', start, UINT64_MAX, &sent), 0);
  CHECK_EQ(sent, total - start);
  std::vector<unsigned char> data(static_cast<size_t>(std::ftell(f)));
  std::rewind(f);
  CHECK_EQ(std::fread(data.data(), 1, data.size(), f), data.size());
  std::fclose(f);
  auto le = [&](size_t at, int bytes) {
    uint64_t v = 0;
    for (int i = 0; i < bytes; ++i) v |= static_cast<uint64_t>(data[at + i]) << (8 * i);
    return v;
  };
  const int widths[11] = {8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1};
  for (int c = 0; c < 11; ++c) CHECK_EQ(format::kColumns[c].width, size_t(widths[c]));
  size_t pos = 0, frames = 0;
  uint64_t seq = start;
  while (pos + 9 + 48 <= data.size()) {
    CHECK_EQ(data[pos], 'K');
    size_t end = pos + 9 + le(pos + 1, 8);
    size_t h = pos + 9;
    uint64_t first = le(h, 8), count = le(h + 8, 4), mask = le(h + 12, 2);
    CHECK_EQ(first, seq);
    uint64_t alloc = le(h + 16, 8), freed = le(h + 24, 8);
    int64_t min_ts = static_cast<int64_t>(le(h + 32, 8)), max_ts = static_cast<int64_t>(le(h + 40, 8));
    CHECK(first < want.size() && min_ts == want[first].timestamp_ns);  // times never go back
    CHECK(first + count <= want.size() && max_ts == want[first + count - 1].timestamp_ns);
    size_t offsets[11];
    size_t at = h + 48;
    for (int c = 0; c < 11; ++c) {
      offsets[c] = at;
      at += widths[c] * ((mask >> c & 1) ? count : 1);
    }
    CHECK_EQ(at, end);
    for (uint64_t i = 0; i < count && first + i < want.size(); ++i) {
      auto col = [&](int c) { return le(offsets[c] + ((mask >> c & 1) ? i : 0) * widths[c],
                                        widths[c]); };
      const EventRow& w = want[first + i];
      alloc += (col(10) == 0 || col(10) == 2) ? col(2) : 0;
      freed += col(10) == 1 ? col(2) : 0;
      bool same = col(0) == static_cast<uint64_t>(w.timestamp_ns) && col(1) == w.address &&
                  col(2) == w.size && col(3) == w.stream && col(4) == w.step &&
                  col(5) == w.thread_id && col(6) == w.stack_id && col(7) == w.type_id &&
                  static_cast<int16_t>(col(8)) == w.device && col(9) == w.context_id &&
                  col(10) == uint64_t(w.kind) && alloc == w.total_allocated &&
                  freed == w.total_freed;
      if (!same) {
        CHECK(same);
        break;
      }
    }
    CHECK(!(mask & 1u << 7) && !(mask & 1u << 8));  // one type, one device throughout
    CHECK_EQ(bool(mask & 1u << 9), first + count > 18000);  // contexts vary late only
    seq += count;
    pos = end;
    ++frames;
  }
  CHECK_EQ(pos, data.size());
  CHECK_EQ(seq, total);
  CHECK_EQ(frames, 2u);
}

// Every event carries the context of the thread that recorded it: an
// allocation its allocator's, a free the freeing thread's; the live map keeps
// the allocation's; replay keeps them all; the peak's seq is the first event
// at the peak.
void test_contexts() {
  ContextTable t;
  CHECK_EQ(t.intern("", 0), 0u);
  uint16_t fwd = t.intern("Net.fc1", 1);
  CHECK_EQ(fwd, 1u);
  CHECK_EQ(t.intern("Net.fc1", 2), 2u);
  CHECK_EQ(t.intern("Net.fc1", 1), fwd);
  CHECK_EQ(t.intern("x", 9), t.intern("x", 0));  // a bad phase is "other"
  CHECK_EQ(t.since(1).size(), 3u);
  CHECK(t.since(1)[0].module == "Net.fc1" && t.since(1)[0].phase == 1);

  Recorder r;
  set_current_context(7);
  r.record_alloc(0x10, 100, kTypeCPU, -1, 0, 0);
  std::thread other([&] {
    CHECK_EQ(current_context(), 0u);  // per thread
    set_current_context(9);
    r.record_alloc(0x20, 300, kTypeCPU, -1, 0, 0);
    r.record_free(0x10, -1);
  });
  other.join();
  CHECK_EQ(current_context(), 7u);
  set_current_context(3);
  r.record_marker(EventKind::Snapshot, 0, 0);
  r.record_realloc(0x20, 0x30, 50, 0);
  set_current_context(0);
  std::vector<EventRow> rows = r.read(0, UINT64_MAX);
  CHECK_EQ(rows.size(), 6u);
  const uint16_t want[6] = {7, 9, 9, 3, 3, 3};
  for (size_t i = 0; i < rows.size() && i < 6; ++i) CHECK_EQ(rows[i].context_id, want[i]);
  LiveEntry e;
  CHECK(r.lookup_live(0x30, &e) && e.context == 3);
  uint64_t addrs[3] = {0x30, 0x10, 0x99}, seqs[3];
  uint16_t ctx[3];
  r.live_seqs(addrs, 3, seqs, ctx);
  CHECK(seqs[0] == 5 && ctx[0] == 3 && seqs[1] == UINT64_MAX && seqs[2] == UINT64_MAX);
  CHECK_EQ(r.peak_seq(), 1u);  // 400 bytes after the second allocation
  Recorder b;
  for (const EventRow& row : rows) b.replay(row);
  std::vector<EventRow> back = b.read(0, UINT64_MAX);
  CHECK_EQ(back.size(), rows.size());
  for (size_t i = 0; i < rows.size() && i < back.size(); ++i)
    CHECK_EQ(back[i].context_id, rows[i].context_id);
  CHECK_EQ(b.peak_seq(), 1u);
  Recorder empty;
  CHECK_EQ(empty.peak_seq(), UINT64_MAX);
  r.reset_peak(-1, -2);  // every type, every device
  CHECK_EQ(r.peak_seq(), 5u);  // reset: the last event is the peak's moment
}

void test_host_free_routing() {
  // Each free goes to the recorder holding the block live, current first.
  auto a = std::make_shared<Recorder>();
  auto b = std::make_shared<Recorder>();
  set_host_recorder(a);
  a->record_alloc(0x1000, 10, kTypeCPU, -1, 0, 0);
  set_host_recorder(b);
  b->record_alloc(0x2000, 20, kTypeCPU, -1, 0, 0);
  CHECK(host_recorder() == b.get());
  CHECK(record_host_free(0x1000));   // a's block, freed while b is fed
  CHECK(record_host_free(0x2000));
  CHECK(!record_host_free(0x3000));  // nobody's: not an anomaly anywhere
  CHECK(!record_host_free(0x1000));  // already freed
  CHECK_COUNTERS(a->total(), 10, 10, 0, 10, 1, 1);
  CHECK_COUNTERS(b->total(), 20, 20, 0, 20, 1, 1);
  CHECK_EQ(a->anomaly_counts()[0] + b->anomaly_counts()[0], 0u);
  a->set_enabled(false);  // a disabled recorder is not fed its frees
  set_host_recorder(a);
  a->set_enabled(true);
  a->record_alloc(0x4000, 5, kTypeCPU, -1, 0, 0);
  a->set_enabled(false);
  CHECK(!record_host_free(0x4000));
  a->set_enabled(true);
  CHECK_EQ(a->total().current, 5u);
  forget_host_recorders();
  CHECK(host_recorder() == nullptr);
  CHECK(!record_host_free(0x4000));
  CHECK_EQ(a->total().current, 5u);
#ifdef TORCHMEM_TEST_PLUGIN
  set_host_recorder(b);
  int dummy = 0;
  CHECK_EQ(torchmem_host_alloc(&dummy, 4), 1);
  CHECK_EQ(torchmem_host_alloc(nullptr, 4), 0);
  CHECK_EQ(b->total().current, 4u);
  torchmem_host_free(&dummy);
  CHECK_EQ(b->total().current, 0u);
  set_host_recorder(nullptr);
  CHECK_EQ(torchmem_host_alloc(&dummy, 4), 0);
#endif
}

// -- the CUDA plugin's entry points -----------------------------------------------

#ifdef TORCHMEM_TEST_PLUGIN
struct PluginStats {
  uint64_t v[12];
  uint64_t current() const { return v[0]; }
  uint64_t allocated() const { return v[2]; }
  uint64_t freed() const { return v[3]; }
  uint64_t alloc_count() const { return v[4]; }
  uint64_t free_count() const { return v[5]; }
  uint64_t oom_count() const { return v[6]; }
  uint64_t live_blocks() const { return v[10]; }
  uint64_t unknown_frees() const { return v[11]; }
};
PluginStats plugin_stats(int device) {
  PluginStats s{};
  CHECK_EQ(torchmem_plugin_stats(device, s.v, 12), 12);
  return s;
}

void test_plugin() {
  CHECK_EQ(torchmem_plugin_set_backend("nonsense"), -1);
  CHECK_EQ(torchmem_plugin_set_backend(nullptr), -1);
  CHECK_EQ(torchmem_plugin_set_backend("host"), 0);
  CHECK(std::strcmp(torchmem_plugin_backend(), "host") == 0);
  torchmem_plugin_set_oom_throws(0);
  auto rec = std::make_shared<Recorder>();
  set_gpu_recorder(rec);
  CHECK(gpu_recorder() == rec.get());
  PluginStats before = plugin_stats(-1);

  CHECK(torchmem_malloc(0, 0, nullptr) == nullptr);  // size 0: null, nothing recorded
  torchmem_free(nullptr, 0, 0, nullptr);
  const int kThreads = 8;
  const int kIters = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([t] {
      void* stream = reinterpret_cast<void*>(static_cast<uintptr_t>(t % 3));
      std::vector<void*> held;
      for (int i = 0; i < kIters; ++i) {
        void* p = torchmem_malloc(64 + t, t % 2, stream);
        if (!p) { ++g_failures; continue; }
        std::memset(p, 0xAB, 64 + t);  // the host backend hands out real memory
        if (i % 3 == 0) torchmem_record_stream(p, reinterpret_cast<void*>(uintptr_t{99}));
        size_t sz = 0;
        if (torchmem_base_alloc(p, &sz) != p || sz != static_cast<size_t>(64 + t))
          ++g_failures;
        if (i % 10 == 0) held.push_back(p);
        else torchmem_free(p, 64 + t, t % 2, stream);
      }
      for (void* p : held) torchmem_free(p, 0, t % 2, stream);  // size 0: use the map's
    });
  for (auto& th : threads) th.join();
  PluginStats after = plugin_stats(-1);
  uint64_t bytes = 0;
  for (int t = 0; t < kThreads; ++t) bytes += uint64_t(kIters) * (64 + t);
  CHECK_EQ(after.alloc_count() - before.alloc_count(), uint64_t(kThreads) * kIters);
  CHECK_EQ(after.free_count() - before.free_count(), uint64_t(kThreads) * kIters);
  CHECK_EQ(after.allocated() - before.allocated(), bytes);
  CHECK_EQ(after.freed() - before.freed(), bytes);
  CHECK_EQ(after.live_blocks(), before.live_blocks());
  CHECK_EQ(after.current(), before.current());
  Counters c = rec->total();
  CHECK_EQ(c.alloc_count, uint64_t(kThreads) * kIters);
  CHECK_EQ(c.allocated, bytes);
  CHECK_EQ(c.freed, bytes);
  CHECK_EQ(c.current, 0u);
  CHECK_COUNTERS(rec->for_type(kTypeGPU), bytes, bytes, 0, c.peak, c.alloc_count,
                 c.free_count);
  for (uint64_t k : rec->anomaly_counts()) CHECK_EQ(k, 0u);

  // A pointer the plugin never handed out: counted, never passed to free().
  int on_stack = 0;
  torchmem_free(&on_stack, 4, 0, nullptr);
  CHECK_EQ(plugin_stats(-1).unknown_frees() - after.unknown_frees(), 1u);
  CHECK_EQ(rec->anomaly_counts()[static_cast<int>(AnomalyKind::UnknownFree)], 1u);

  // Disabled recorder: the plugin still allocates and counts, records nothing.
  rec->set_enabled(false);
  void* p = torchmem_malloc(100, 0, nullptr);
  CHECK(p != nullptr);
  torchmem_free(p, 100, 0, nullptr);
  CHECK_EQ(rec->total().alloc_count, c.alloc_count);
  rec->set_enabled(true);

  // Switching backends while a block is live is refused.
  void* live = torchmem_malloc(16, 0, nullptr);
  CHECK_EQ(torchmem_plugin_set_backend("fake"), -2);
  torchmem_free(live, 16, 0, nullptr);

  // Fake backend: a failed allocation becomes an OOM event and a null.
  CHECK_EQ(torchmem_plugin_set_backend("fake"), 0);
  torchmem_fake_set_mem_info(1000, 5000);
  torchmem_fake_fail_next(2);  // the allocation and its one retry
  CHECK(torchmem_malloc(4096, 1, nullptr) == nullptr);
  CHECK_EQ(plugin_stats(1).oom_count() - before.oom_count(), 1u);
  CHECK_EQ(rec->oom_events().size(), 1u);
  if (!rec->oom_events().empty()) {
    CHECK_EQ(rec->oom_events()[0].requested, 4096u);
    CHECK_EQ(rec->oom_events()[0].device_total, 5000u);
  }
  char msg[512];
  size_t n = torchmem_plugin_last_oom_message(msg, sizeof msg);
  CHECK(n > 0 && std::strstr(msg, "out of memory") != nullptr);
  char tiny[4];
  torchmem_plugin_last_oom_message(tiny, sizeof tiny);
  CHECK_EQ(std::strlen(tiny), 3u);  // truncated, still terminated
  torchmem_fake_fail_next(1);       // first try fails, the retry succeeds
  void* q = torchmem_malloc(64, 1, nullptr);
  CHECK(q != nullptr);
  torchmem_free(q, 64, 1, nullptr);
  // The memory-fraction cap refuses what would pass it.
  torchmem_set_memory_fraction(0.5, 1);  // 2500 bytes of the fake's 5000
  CHECK(torchmem_malloc(3000, 1, nullptr) == nullptr);
  void* ok = torchmem_malloc(2000, 1, nullptr);
  CHECK(ok != nullptr);
  torchmem_free(ok, 2000, 1, nullptr);
  torchmem_set_memory_fraction(1.0, 1);
  torchmem_reset();
  torchmem_fake_clear();
  CHECK_EQ(torchmem_plugin_live_blocks(), before.live_blocks());
  // Devices outside the table share one overflow slot; still exact.
  void* far = torchmem_malloc(8, 1000, nullptr);
  CHECK(far != nullptr);
  torchmem_free(far, 8, 1000, nullptr);
  CHECK_EQ(torchmem_plugin_live_blocks(), before.live_blocks());
  CHECK_EQ(rec->total().current, 0u);
  char desc[256];
  CHECK(torchmem_cuda_runtime_description(desc, sizeof desc) > 0);
  set_gpu_recorder(nullptr);
  CHECK(gpu_recorder() == nullptr);
  CHECK_EQ(torchmem_plugin_set_backend("host"), 0);
}
#endif

}  // namespace

int main() {
  test_alloc_free_counters();
  test_anomalies();
  test_realloc();
  test_markers_steps_types();
  test_replay();
  test_eviction();
  test_threads();
  test_fork_while_busy();
  test_host_free_routing();
  test_column_frames();
  test_contexts();
#ifdef TORCHMEM_TEST_PLUGIN
  test_plugin();
  const char* plugin = "with";
#else
  const char* plugin = "without";
#endif
  int failures = g_failures.load();
  std::printf("test_recorder (%s the plugin): %d checks, %d failures\n", plugin, g_checks,
              failures);
  return failures > 100 ? 100 : failures;
}
