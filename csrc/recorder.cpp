// The Recorder's members (recorder.hpp). Over 400 lines on purpose: one class
// whose members share its lock and private state; the process-wide recorders
// are in recorder_slots.cpp.
#include "recorder.hpp"

#include <pthread.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>

namespace torchmem {

namespace {
constexpr size_t kExamplesPerKind = 8;

}  // namespace

const char* anomaly_name(AnomalyKind kind) {
  switch (kind) {
    case AnomalyKind::UnknownFree: return "unknown_free";
    case AnomalyKind::DoubleFree: return "double_free";
    case AnomalyKind::SizeMismatch: return "size_mismatch";
    case AnomalyKind::AllocOverLive: return "alloc_over_live";
    case AnomalyKind::BadArgument: return "bad_argument";
  }
  return "unknown";
}

uint32_t current_thread_id() {
  // initial-exec: a plain %fs load instead of a __tls_get_addr call.
  static thread_local uint32_t tid __attribute__((tls_model("initial-exec"))) = 0;
  if (tid == 0) tid = static_cast<uint32_t>(syscall(SYS_gettid));
  return tid;
}

namespace {
std::mutex g_registry_mu;
std::vector<Recorder*>& registry() {
  static auto* recorders = new std::vector<Recorder*>();  // outlives every recorder
  return *recorders;
}
void register_atfork_once() {
  static bool done = [] {
    pthread_atfork(&Recorder::lock_all_for_fork, &Recorder::unlock_all_after_fork,
                   &Recorder::unlock_all_after_fork);
    return true;
  }();
  (void)done;
}
}  // namespace

void Recorder::lock_all_for_fork() {
  g_registry_mu.lock();
  for (Recorder* r : registry()) r->mu_.lock();
}

void Recorder::unlock_all_after_fork() {
  for (Recorder* r : registry()) r->mu_.unlock();
  g_registry_mu.unlock();
}

Recorder::~Recorder() {
  std::lock_guard<std::mutex> lock(g_registry_mu);
  auto& all = registry();
  all.erase(std::remove(all.begin(), all.end(), this), all.end());
}

Recorder::Recorder(uint64_t retention_events)
    : log_(retention_events),
      type_names_{"GPU", "CPU", "Pinned"},
      streams_{0} {
  for (uint16_t i = 0; i < type_names_.size(); ++i) type_ids_[type_names_[i]] = i;
  by_type_.resize(type_names_.size());
  by_pair_.resize(type_names_.size());
  register_atfork_once();
  std::lock_guard<std::mutex> lock(g_registry_mu);
  registry().push_back(this);
}

int64_t Recorder::now_ns() {
  // Monotonic-driven (clock.hpp) and clamped, so the log never goes back.
  int64_t ts = clock_.now_ns();
  if (ts < last_ts_) ts = last_ts_;
  last_ts_ = ts;
  return ts;
}

uint16_t Recorder::type_id(const std::string& name) {
  std::lock_guard<SpinLock> lock(mu_);
  auto it = type_ids_.find(name);
  if (it != type_ids_.end()) return it->second;
  if (type_names_.size() >= kTypeNone) return kTypeNone;
  uint16_t id = static_cast<uint16_t>(type_names_.size());
  type_names_.push_back(name);
  type_ids_.emplace(name, id);
  by_type_.emplace_back();
  by_pair_.emplace_back();
  cached_type_ = 0xFFFF;  // by_type_ / by_pair_ may have moved
  return id;
}

std::vector<std::string> Recorder::type_names() const {
  std::lock_guard<SpinLock> lock(mu_);
  return type_names_;
}

uint16_t Recorder::stream_index_locked(uint64_t stream) {
  if (stream == 0) return 0;
  // Few streams exist in practice: a short scan beats a hash map.
  for (size_t i = 1; i < streams_.size(); ++i)
    if (streams_[i] == stream) return static_cast<uint16_t>(i);
  if (streams_.size() >= 0xFFFF) return 0xFFFF;
  streams_.push_back(stream);
  return static_cast<uint16_t>(streams_.size() - 1);
}

Recorder::Slices Recorder::slices_slow_locked(uint16_t type_id, int16_t device) {
  // The Python layer rejects devices below -1, but a corrupt trace row or a
  // native caller may pass one: count it with the host slot rather than
  // index before the tables.
  size_t d = device < -1 ? 0 : static_cast<size_t>(device + 1);
  // Growing a vector moves its elements: drop the cached pointers first.
  if (by_device_.size() <= d) by_device_.resize(d + 1);
  std::vector<Counters>& row = by_pair_[type_id];
  if (row.size() <= d) row.resize(d + 1);
  cached_type_ = type_id;
  cached_device_ = device;
  cached_ = Slices{&row[d], &by_type_[type_id], &by_device_[d]};
  return cached_;
}

void Recorder::anomaly_locked(AnomalyKind kind, uint64_t address, uint64_t size,
                              uint64_t expected, int64_t ts, uint32_t tid) {
  ++anomaly_counts_[static_cast<int>(kind)];
  size_t same = 0;
  for (const AnomalyExample& e : anomaly_examples_) same += (e.kind == kind);
  if (same >= kExamplesPerKind) {
    auto it = std::find_if(anomaly_examples_.begin(), anomaly_examples_.end(),
                           [kind](const AnomalyExample& e) { return e.kind == kind; });
    anomaly_examples_.erase(it);
  }
  anomaly_examples_.push_back(
      AnomalyExample{kind, address, size, expected, log_.next_seq(), ts, tid});
}

void Recorder::record_anomaly(AnomalyKind kind, uint64_t address, uint64_t size,
                              uint64_t expected) {
  uint32_t tid = current_thread_id();
  std::lock_guard<SpinLock> lock(mu_);
  anomaly_locked(kind, address, size, expected, now_ns(), tid);
}

void Recorder::apply_alloc_locked(uint64_t address, uint64_t size, uint16_t type_id,
                                  int16_t device, uint16_t stream_idx,
                                  uint32_t stack_id, int64_t ts, uint64_t step,
                                  uint32_t tid, uint16_t context, uint64_t seq) {
  Slices sl = slices_locked(type_id, device);
  sl.pair->add(size);
  sl.type->add(size);
  sl.device->add(size);
  uint64_t peak_before = total_.peak;
  total_.add(size);
  if (total_.peak != peak_before) peak_seq_ = seq;
  live_.put(address, LiveEntry{address, size, ts, seq,
                               static_cast<uint32_t>(std::min<uint64_t>(step, UINT32_MAX)),
                               stack_id, tid, type_id, stream_idx, device, context});
  recently_freed_.erase(address);
}

bool Recorder::apply_free_locked(uint64_t address, int64_t size, LiveEntry* freed,
                                 int64_t ts, uint32_t tid) {
  if (!live_.erase(address, freed)) {
    bool twice = recently_freed_.contains(address);
    anomaly_locked(twice ? AnomalyKind::DoubleFree : AnomalyKind::UnknownFree, address,
                   size < 0 ? 0 : static_cast<uint64_t>(size), 0, ts, tid);
    return false;
  }
  if (size >= 0 && static_cast<uint64_t>(size) != freed->size)
    anomaly_locked(AnomalyKind::SizeMismatch, address, static_cast<uint64_t>(size),
                   freed->size, ts, tid);
  // The size recorded at allocation is what leaves the counters, so they
  // always equal the sum of live sizes whatever the caller claims.
  uint64_t n = freed->size;
  Slices sl = slices_locked(freed->type_id, freed->device);
  sl.pair->remove(n);
  sl.type->remove(n);
  sl.device->remove(n);
  total_.remove(n);
  recently_freed_.insert(address);
  return true;
}

bool Recorder::free_and_log_locked(uint64_t address, int64_t size, LiveEntry* gone,
                                   int64_t ts, uint64_t step, uint32_t tid,
                                   uint16_t context) {
  if (!apply_free_locked(address, size, gone, ts, tid)) return false;
  log_.append(ts, EventKind::Deallocation, address, gone->size, gone->device,
              gone->stream_idx, gone->type_id, step, tid, gone->stack_id, context,
              total_.allocated, total_.freed - gone->size);
  return true;
}

void Recorder::close_if_live_locked(uint64_t address, uint64_t new_size, int64_t ts,
                                    uint64_t step, uint32_t tid, uint16_t context) {
  LiveEntry* old = live_.find(address);
  if (!old) return;
  // The allocator reused a live address, so we missed its free: close the
  // old allocation so the counters keep matching the live set.
  anomaly_locked(AnomalyKind::AllocOverLive, address, new_size, old->size, ts, tid);
  LiveEntry gone;
  free_and_log_locked(address, -1, &gone, ts, step, tid, context);
}

void Recorder::record_alloc(uint64_t address, uint64_t size, uint16_t type_id,
                            int16_t device, uint64_t stream, uint32_t stack_id) {
  if (!enabled()) return;
  if (type_id >= kTypeNone) type_id = kTypeCPU;
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  if (type_id >= by_type_.size()) type_id = kTypeCPU;
  int64_t ts = now_ns();
  uint64_t step = step_.load(std::memory_order_relaxed);
  close_if_live_locked(address, size, ts, step, tid, ctx);
  uint16_t si = stream_index_locked(stream);
  uint64_t seq = log_.append(ts, EventKind::Allocation, address, size, device, si,
                             type_id, step, tid, stack_id, ctx, total_.allocated,
                             total_.freed);
  apply_alloc_locked(address, size, type_id, device, si, stack_id, ts, step, tid, ctx, seq);
}

void Recorder::record_free(uint64_t address, int64_t size) {
  if (!enabled()) return;
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  int64_t ts = now_ns();
  LiveEntry gone;
  free_and_log_locked(address, size, &gone, ts, step_.load(std::memory_order_relaxed), tid,
                      ctx);
}

bool Recorder::record_free_if_live(uint64_t address) {
  if (!enabled()) return false;
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  if (!live_.find(address)) return false;
  LiveEntry gone;
  return free_and_log_locked(address, -1, &gone, now_ns(), step_.load(std::memory_order_relaxed),
                             tid, ctx);
}

void Recorder::record_realloc(uint64_t old_address, uint64_t new_address,
                              uint64_t new_size, uint32_t stack_id) {
  if (!enabled()) return;
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  int64_t ts = now_ns();
  uint64_t step = step_.load(std::memory_order_relaxed);
  LiveEntry old;
  uint16_t type_id = kTypeCPU, si = 0;
  int16_t device = -1;
  if (free_and_log_locked(old_address, -1, &old, ts, step, tid, ctx)) {
    type_id = old.type_id;
    si = old.stream_idx;
    device = old.device;
  }
  close_if_live_locked(new_address, new_size, ts, step, tid, ctx);
  uint64_t seq = log_.append(ts, EventKind::Reallocation, new_address, new_size, device,
                             si, type_id, step, tid, stack_id, ctx, total_.allocated,
                             total_.freed);
  apply_alloc_locked(new_address, new_size, type_id, device, si, stack_id, ts, step, tid,
                     ctx, seq);
}

uint64_t Recorder::record_marker(EventKind kind, uint64_t payload, uint64_t size) {
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  int64_t ts = now_ns();
  return log_.append(ts, kind, payload, size, -1, 0, kTypeNone,
                     step_.load(std::memory_order_relaxed), tid, 0, ctx, total_.allocated,
                     total_.freed);
}

void Recorder::record_oom(const OomInfo& info, uint16_t type_id) {
  uint32_t tid = current_thread_id();
  uint16_t ctx = current_context();
  std::lock_guard<SpinLock> lock(mu_);
  int64_t ts = now_ns();
  OomInfo stored = info;
  stored.timestamp_ns = ts;
  stored.live_bytes = slices_locked(type_id < by_type_.size() ? type_id : kTypeCPU,
                                    info.device).pair->current;
  stored.seq = log_.append(ts, EventKind::OutOfMemory, ooms_.size(), info.requested,
                           info.device, stream_index_locked(info.stream), type_id,
                           step_.load(std::memory_order_relaxed), tid, info.stack_id, ctx,
                           total_.allocated, total_.freed);
  ooms_.push_back(stored);
}

void Recorder::replay(const EventRow& row) {
  std::lock_guard<SpinLock> lock(mu_);
  last_ts_ = std::max(last_ts_, row.timestamp_ns);
  if (row.step > step_.load(std::memory_order_relaxed)) step_.store(row.step);
  uint16_t type_id = row.type_id;
  bool typed = type_id < by_type_.size();
  uint16_t si = stream_index_locked(row.stream);
  uint64_t seq = log_.next_seq();
  switch (row.kind) {
    case EventKind::Allocation:
    case EventKind::Reallocation:
      if (!typed) break;
      log_.append(row.timestamp_ns, row.kind, row.address, row.size, row.device, si,
                  type_id, row.step, row.thread_id, row.stack_id, row.context_id,
                  total_.allocated, total_.freed);
      apply_alloc_locked(row.address, row.size, type_id, row.device, si, row.stack_id,
                         row.timestamp_ns, row.step, row.thread_id, row.context_id, seq);
      return;
    case EventKind::Deallocation: {
      LiveEntry gone;
      free_and_log_locked(row.address, -1, &gone, row.timestamp_ns, row.step, row.thread_id,
                          row.context_id);
      return;
    }
    default:
      break;
  }
  log_.append(row.timestamp_ns, row.kind, row.address, row.size, row.device, si,
              row.type_id, row.step, row.thread_id, row.stack_id, row.context_id,
              total_.allocated, total_.freed);
}

uint64_t Recorder::advance_step() { return step_.fetch_add(1) + 1; }
void Recorder::set_step(uint64_t step) { step_.store(step); }

Counters Recorder::total() const {
  std::lock_guard<SpinLock> lock(mu_);
  return total_;
}

Counters Recorder::for_type(uint16_t type_id) const {
  std::lock_guard<SpinLock> lock(mu_);
  return type_id < by_type_.size() ? by_type_[type_id] : Counters{};
}

Counters Recorder::for_device(int16_t device) const {
  std::lock_guard<SpinLock> lock(mu_);
  size_t d = static_cast<size_t>(device + 1);
  return d < by_device_.size() ? by_device_[d] : Counters{};
}

Counters Recorder::for_type_device(uint16_t type_id, int16_t device) const {
  std::lock_guard<SpinLock> lock(mu_);
  size_t d = static_cast<size_t>(device + 1);
  if (type_id >= by_pair_.size() || d >= by_pair_[type_id].size()) return Counters{};
  return by_pair_[type_id][d];
}

std::vector<std::pair<uint16_t, Counters>> Recorder::per_type() const {
  std::lock_guard<SpinLock> lock(mu_);
  std::vector<std::pair<uint16_t, Counters>> out;
  for (size_t i = 0; i < by_type_.size(); ++i)
    if (by_type_[i].alloc_count) out.emplace_back(static_cast<uint16_t>(i), by_type_[i]);
  return out;
}

std::vector<std::pair<int16_t, Counters>> Recorder::per_device() const {
  std::lock_guard<SpinLock> lock(mu_);
  std::vector<std::pair<int16_t, Counters>> out;
  for (size_t d = 0; d < by_device_.size(); ++d)
    if (by_device_[d].alloc_count)
      out.emplace_back(static_cast<int16_t>(d) - 1, by_device_[d]);
  return out;
}

void Recorder::reset_peak(int type_id, int device) {
  std::lock_guard<SpinLock> lock(mu_);
  auto reset = [](Counters& c) { c.peak = c.current; };
  // -1 is the host, like everywhere else; anything below it means every device.
  const bool all_devices = device < -1;
  if (type_id < 0 && all_devices) {
    reset(total_);
    uint64_t n = log_.next_seq();
    peak_seq_ = (total_.peak == 0 || n == 0) ? UINT64_MAX : n - 1;
  }
  for (size_t t = 0; t < by_pair_.size(); ++t) {
    if (type_id >= 0 && t != static_cast<size_t>(type_id)) continue;
    if (all_devices) reset(by_type_[t]);
    for (size_t d = 0; d < by_pair_[t].size(); ++d)
      if (all_devices || d == static_cast<size_t>(device + 1)) reset(by_pair_[t][d]);
  }
  if (type_id < 0)
    for (size_t d = 0; d < by_device_.size(); ++d)
      if (all_devices || d == static_cast<size_t>(device + 1)) reset(by_device_[d]);
}

std::vector<LiveEntry> Recorder::live(std::vector<uint64_t>* streams) const {
  std::lock_guard<SpinLock> lock(mu_);
  if (streams) *streams = streams_;
  std::vector<LiveEntry> out;
  out.reserve(live_.size());
  live_.for_each([&](uint64_t, const LiveEntry& e) { out.push_back(e); });
  std::sort(out.begin(), out.end(),
            [](const LiveEntry& a, const LiveEntry& b) { return a.seq < b.seq; });
  return out;
}

uint64_t Recorder::peak_seq() const {
  std::lock_guard<SpinLock> lock(mu_);
  return peak_seq_;
}

void Recorder::live_seqs(const uint64_t* addresses, size_t n, uint64_t* seqs,
                         uint16_t* contexts) const {
  std::lock_guard<SpinLock> lock(mu_);
  for (size_t i = 0; i < n; ++i) {
    const LiveEntry* e = live_.find(addresses[i]);
    seqs[i] = e ? e->seq : UINT64_MAX;
    contexts[i] = e ? e->context : 0;
  }
}

bool Recorder::lookup_live(uint64_t address, LiveEntry* out) const {
  std::lock_guard<SpinLock> lock(mu_);
  const LiveEntry* e = live_.find(address);
  if (!e) return false;
  *out = *e;
  return true;
}

uint64_t Recorder::live_count() const {
  std::lock_guard<SpinLock> lock(mu_);
  return live_.size();
}

std::vector<EventRow> Recorder::read(uint64_t start_seq, uint64_t end_seq) const {
  PinnedRead pin(*this, start_seq, end_seq);
  std::vector<EventRow> out(pin.plan().rows);
  EventLog::fill(pin.plan(), out.data());
  return out;
}

Recorder::PinnedRead::PinnedRead(const Recorder& r, uint64_t start_seq, uint64_t end_seq)
    : r_(r) {
  std::lock_guard<SpinLock> lock(r_.mu_);
  plan_ = r_.log_.plan(start_seq, end_seq, r_.streams_);
}

Recorder::PinnedRead::~PinnedRead() {
  std::lock_guard<SpinLock> lock(r_.mu_);
  r_.log_.finish(plan_);
}

uint64_t Recorder::next_seq() const {
  std::lock_guard<SpinLock> lock(mu_);
  return log_.next_seq();
}

uint64_t Recorder::first_retained_seq() const {
  std::lock_guard<SpinLock> lock(mu_);
  return log_.first_seq();
}

std::pair<uint64_t, uint64_t> Recorder::seq_range_for_steps(uint64_t lo, uint64_t hi) const {
  std::lock_guard<SpinLock> lock(mu_);
  uint64_t a = log_.lower_bound_step(lo);
  uint64_t b = hi == UINT64_MAX ? log_.next_seq() : log_.lower_bound_step(hi + 1);
  return {a, std::max(a, b)};
}

uint64_t Recorder::first_seq_at_or_after_time(int64_t timestamp_ns) const {
  std::lock_guard<SpinLock> lock(mu_);
  return log_.lower_bound_time(timestamp_ns);
}

void Recorder::set_consumer_seq(uint64_t seq) {
  std::lock_guard<SpinLock> lock(mu_);
  log_.set_consumer_seq(seq);
}

std::vector<uint64_t> Recorder::anomaly_counts() const {
  std::lock_guard<SpinLock> lock(mu_);
  return std::vector<uint64_t>(anomaly_counts_, anomaly_counts_ + kAnomalyKinds);
}

std::vector<AnomalyExample> Recorder::anomaly_examples() const {
  std::lock_guard<SpinLock> lock(mu_);
  return {anomaly_examples_.begin(), anomaly_examples_.end()};
}

std::vector<OomInfo> Recorder::oom_events() const {
  std::lock_guard<SpinLock> lock(mu_);
  return ooms_;
}

size_t Recorder::memory_bytes() const {
  std::lock_guard<SpinLock> lock(mu_);
  return log_.memory_bytes() + live_.memory_bytes() + recently_freed_.memory_bytes();
}

}  // namespace torchmem
