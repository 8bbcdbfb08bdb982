// The recorder: live-allocation map, exact counters, columnar event log,
// anomalies. Pure C++: nothing here touches Python, so every entry point may
// be called from any thread, with or without the GIL (the CUDA plugin calls
// it from inside torch's allocator with the GIL released). Every event is
// stamped with the calling thread's context (context_table.hpp), so every
// source (track_*, the CPU allocator hook, the CUDA plugin) carries it.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "clock.hpp"
#include "context_table.hpp"
#include "event_log.hpp"
#include "live_map.hpp"
#include "spin_lock.hpp"

namespace torchmem {

// Fixed ids of the built-in allocation types; user strings get ids >= 3.
constexpr uint16_t kTypeGPU = 0;
constexpr uint16_t kTypeCPU = 1;
constexpr uint16_t kTypePinned = 2;
constexpr uint16_t kTypeNone = 0xFFFF;  // markers (snapshot, GC) have no type

// Running totals for one slice (overall, a type, a device, a type+device).
struct Counters {
  uint64_t allocated = 0;  // cumulative bytes allocated
  uint64_t freed = 0;      // cumulative bytes freed
  uint64_t current = 0;    // bytes live now
  uint64_t peak = 0;       // high-water mark of current since start / reset
  uint64_t alloc_count = 0;
  uint64_t free_count = 0;

  void add(uint64_t size) {
    allocated += size;
    current += size;
    ++alloc_count;
    if (current > peak) peak = current;
  }
  void remove(uint64_t size) {
    freed += size;
    current -= size;
    ++free_count;
  }
};

enum class AnomalyKind : uint8_t {
  UnknownFree = 0,   // free of an address never seen
  DoubleFree = 1,    // free of an address already freed and not reused
  SizeMismatch = 2,  // free whose size differs from the allocation's
  AllocOverLive = 3, // allocation at an address that is still live
  BadArgument = 4,   // rejected input that reached the native layer
};
constexpr int kAnomalyKinds = 5;
const char* anomaly_name(AnomalyKind kind);

struct AnomalyExample {
  AnomalyKind kind;
  uint64_t address;
  uint64_t size;      // size given by the caller
  uint64_t expected;  // size the recorder knew (0 when unknown)
  uint64_t seq;       // sequence number of the next event at that moment
  int64_t timestamp_ns;
  uint32_t thread_id;
};

// What the CUDA plugin knew when an allocation failed for good.
struct OomInfo {
  uint64_t seq;
  int64_t timestamp_ns;
  uint64_t requested;
  int16_t device;
  uint64_t stream;
  uint64_t device_free;   // cudaMemGetInfo, bytes (0 when unknown)
  uint64_t device_total;  // bytes (0 when unknown)
  uint64_t live_bytes;    // this recorder's current bytes on that device
  uint32_t stack_id;
};

class Recorder {
 public:
  explicit Recorder(uint64_t retention_events = uint64_t{1} << 20);
  ~Recorder();
  Recorder(const Recorder&) = delete;
  Recorder& operator=(const Recorder&) = delete;

  // fork() while another thread holds a recorder's lock would leave the
  // child's copy locked forever (DataLoader workers fork): every recorder's
  // lock is taken before fork and released after it, in parent and child.
  static void lock_all_for_fork();
  static void unlock_all_after_fork();

  // Cheap check for the hot paths (relaxed atomic).
  bool enabled() const { return enabled_.load(std::memory_order_relaxed); }
  void set_enabled(bool on) { enabled_.store(on, std::memory_order_relaxed); }

  // -- recording; thread safe, never throws, never calls Python ----------
  // Each event carries current_context(); a DEALLOCATION the context of the
  // free (the stack, type and device of the allocation it frees).
  void record_alloc(uint64_t address, uint64_t size, uint16_t type_id,
                    int16_t device, uint64_t stream, uint32_t stack_id);
  // size < 0 means "not given by the caller".
  void record_free(uint64_t address, int64_t size);
  // A free from an allocator hook that may see frees of blocks allocated
  // before this recorder listened: unknown addresses are not anomalies.
  // Returns whether the address was live.
  bool record_free_if_live(uint64_t address);
  // Free old (if live) and allocate new as one REALLOCATION event.
  void record_realloc(uint64_t old_address, uint64_t new_address,
                      uint64_t new_size, uint32_t stack_id);
  // SNAPSHOT, GC_START, GC_END markers. `payload` is stored in the address
  // column (the index of the side record the Python layer keeps) and `size`
  // in the size column. Returns the event's sequence number.
  uint64_t record_marker(EventKind kind, uint64_t payload, uint64_t size);
  void record_oom(const OomInfo& info, uint16_t type_id);
  void record_anomaly(AnomalyKind kind, uint64_t address, uint64_t size,
                      uint64_t expected);

  // Replays an event verbatim (timestamps, steps, threads, stacks, contexts
  // kept), updating counters and the live map: loading a saved trace.
  void replay(const EventRow& row);

  // -- steps --------------------------------------------------------------
  uint64_t step() const { return step_.load(std::memory_order_relaxed); }
  uint64_t advance_step();
  void set_step(uint64_t step);

  // -- allocation types and streams ----------------------------------------
  uint16_t type_id(const std::string& name);  // interns
  std::vector<std::string> type_names() const;

  // -- reading (each takes the lock briefly) -------------------------------
  Counters total() const;
  Counters for_type(uint16_t type_id) const;
  Counters for_device(int16_t device) const;
  Counters for_type_device(uint16_t type_id, int16_t device) const;
  std::vector<std::pair<uint16_t, Counters>> per_type() const;
  std::vector<std::pair<int16_t, Counters>> per_device() const;
  // Peak := current, for every slice matching (type, device): type -1 = any type,
  // device -1 = the host, device < -1 = any device.
  void reset_peak(int type_id, int device);
  // The seq of the event after which the total reached its peak (the first
  // time it did; after reset_peak, the last event then). UINT64_MAX while
  // the peak is 0.
  uint64_t peak_seq() const;

  // Every live allocation, oldest first; `streams` (optional) receives the
  // stream table, read under the same lock, to resolve stream_idx.
  std::vector<LiveEntry> live(std::vector<uint64_t>* streams = nullptr) const;
  bool lookup_live(uint64_t address, LiveEntry* out) const;
  // lookup_live for many addresses under one lock: seq[i] = the live
  // allocation's seq, or UINT64_MAX when addresses[i] is not live.
  void live_seqs(const uint64_t* addresses, size_t n, uint64_t* seqs,
                 uint16_t* contexts) const;
  uint64_t live_count() const;

  std::vector<EventRow> read(uint64_t start_seq, uint64_t end_seq) const;
  // A read of [start_seq, end_seq) for callers that supply the buffer or
  // send the columns as they are: the lock is held only while the range is
  // planned (pinned) and, in the destructor, unpinned; in between,
  // EventLog::fill(plan(), out) or EventLog::columns_of(plan(), i) run
  // without it while training threads keep recording.
  class PinnedRead {
   public:
    PinnedRead(const Recorder& r, uint64_t start_seq, uint64_t end_seq);
    ~PinnedRead();
    PinnedRead(const PinnedRead&) = delete;
    PinnedRead& operator=(const PinnedRead&) = delete;
    const EventLog::ReadPlan& plan() const { return plan_; }

   private:
    const Recorder& r_;
    EventLog::ReadPlan plan_;
  };
  uint64_t next_seq() const;
  uint64_t first_retained_seq() const;
  // Sequence range [first, last) whose steps lie in [lo, hi], within retention.
  std::pair<uint64_t, uint64_t> seq_range_for_steps(uint64_t lo, uint64_t hi) const;
  uint64_t first_seq_at_or_after_time(int64_t timestamp_ns) const;
  // Events before `seq` may leave the ring only once a consumer has read
  // them; UINT64_MAX (the default) means nobody needs them.
  void set_consumer_seq(uint64_t seq);

  std::vector<uint64_t> anomaly_counts() const;
  std::vector<AnomalyExample> anomaly_examples() const;
  std::vector<OomInfo> oom_events() const;

  uint64_t retention() const { return log_.retention(); }
  size_t memory_bytes() const;  // event log + live map + tables

 private:
  uint16_t stream_index_locked(uint64_t stream);
  void apply_alloc_locked(uint64_t address, uint64_t size, uint16_t type_id,
                          int16_t device, uint16_t stream_idx, uint32_t stack_id,
                          int64_t ts, uint64_t step, uint32_t tid, uint16_t context,
                          uint64_t seq);
  bool apply_free_locked(uint64_t address, int64_t size, LiveEntry* freed,
                         int64_t ts, uint32_t tid);
  // apply_free_locked, then the DEALLOCATION event; false when not live.
  bool free_and_log_locked(uint64_t address, int64_t size, LiveEntry* gone, int64_t ts,
                           uint64_t step, uint32_t tid, uint16_t context);
  // An allocation at a live address: count the anomaly, close the old one.
  void close_if_live_locked(uint64_t address, uint64_t new_size, int64_t ts,
                            uint64_t step, uint32_t tid, uint16_t context);
  // The four counter sets an event of (type, device) updates.
  struct Slices {
    Counters* pair;
    Counters* type;
    Counters* device;
  };
  Slices slices_locked(uint16_t type_id, int16_t device) {
    if (type_id == cached_type_ && device == cached_device_) return cached_;
    return slices_slow_locked(type_id, device);
  }
  Slices slices_slow_locked(uint16_t type_id, int16_t device);
  void anomaly_locked(AnomalyKind kind, uint64_t address, uint64_t size,
                      uint64_t expected, int64_t ts, uint32_t tid);
  int64_t now_ns();

  mutable SpinLock mu_;
  std::atomic<bool> enabled_{true};
  std::atomic<uint64_t> step_{0};

  LiveMap live_;
  AddressSet recently_freed_;  // for telling double free from unknown free
  EventLog log_;

  Counters total_;
  uint64_t peak_seq_ = UINT64_MAX;  // see peak_seq()
  std::vector<Counters> by_type_;
  std::vector<Counters> by_device_;               // index device + 1
  std::vector<std::vector<Counters>> by_pair_;    // [type][device + 1]
  // Most events hit the same (type, device) as the one before.
  uint16_t cached_type_ = 0xFFFF;
  int16_t cached_device_ = -2;
  Slices cached_{nullptr, nullptr, nullptr};

  std::vector<std::string> type_names_;
  std::unordered_map<std::string, uint16_t> type_ids_;
  std::vector<uint64_t> streams_;                 // stream index -> value

  uint64_t anomaly_counts_[kAnomalyKinds] = {};
  std::deque<AnomalyExample> anomaly_examples_;   // the last few of each kind
  std::vector<OomInfo> ooms_;

  Clock clock_;              // read under mu_
  int64_t last_ts_ = 0;      // keeps timestamps non-decreasing
};

// The recorder the CUDA plugin feeds (process-wide; null when none).
Recorder* gpu_recorder();
void set_gpu_recorder(std::shared_ptr<Recorder> recorder);

// The recorder the CPU allocator hook feeds (process-wide; null when none).
Recorder* host_recorder();
void set_host_recorder(std::shared_ptr<Recorder> recorder);
// The free of a block the hook recorded, logged in whichever host recorder
// (current first, then earlier ones) holds it live. False when none does.
bool record_host_free(uint64_t address);
// In a forked child: no host recorder is fed any more.
void forget_host_recorders();

// Kernel thread id of the caller, cached per thread.
uint32_t current_thread_id();

}  // namespace torchmem
