#include "trace_frames.hpp"

#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <vector>

#include "recorder.hpp"
#include "trace_format.hpp"

namespace torchmem {

namespace {

// writev() until every byte is out; 0, or the errno of the failure.
int writev_fully(int fd, iovec* iov, int count) {
  while (count > 0) {
    ssize_t n = ::writev(fd, iov, count);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    size_t left = static_cast<size_t>(n);
    while (count > 0 && left >= iov->iov_len) {
      left -= iov->iov_len;
      ++iov;
      --count;
    }
    if (count > 0) {
      iov->iov_base = static_cast<char*>(iov->iov_base) + left;
      iov->iov_len -= left;
    }
  }
  return 0;
}

template <typename T>
bool all_equal(const T* p, uint32_t n) {
  // Branch-free so it vectorises: a column is checked at a fraction of
  // what sending it would cost.
  T diff = 0;
  for (uint32_t i = 1; i < n; ++i) diff |= static_cast<T>(p[i] ^ p[0]);
  return diff == 0;
}

void put_le(unsigned char* out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

// The chunk header after the frame header (format::kColumnsHeader):
// first_seq u64, n u32, full_mask u16, reserved u16, allocated_before u64,
// freed_before u64, and the earliest and latest timestamp (i64): the writer
// indexes the chunk by time from them, without a Python pass over the
// column (~60 ns per event).
constexpr size_t kFrameHead = format::kFrameHeaderBytes;
constexpr size_t kChunkHead = format::kColumnsHeaderBytes;
constexpr int kColumns = format::kColumnCount;
static_assert(kColumns <= 16, "full_mask has 16 bits");
// Each column goes out as the event log holds it: the widths must agree.
template <typename T>
constexpr size_t width_of(const T*) { return sizeof(T); }
constexpr EventLog::ColumnView kView{};
static_assert(width_of(kView.timestamp) == format::kColumns[format::kColTimestamp].width &&
              width_of(kView.address) == format::kColumns[format::kColAddress].width &&
              width_of(kView.size) == format::kColumns[format::kColSize].width &&
              sizeof(uint64_t) == format::kColumns[format::kColStream].width &&
              width_of(kView.step) == format::kColumns[format::kColStep].width &&
              width_of(kView.thread_id) == format::kColumns[format::kColThread].width &&
              width_of(kView.stack_id) == format::kColumns[format::kColStack].width &&
              width_of(kView.type_id) == format::kColumns[format::kColType].width &&
              width_of(kView.device) == format::kColumns[format::kColDevice].width &&
              width_of(kView.context) == format::kColumns[format::kColContext].width &&
              width_of(kView.kind) == format::kColumns[format::kColKind].width,
              "format::kColumns matches the event log's columns");

}  // namespace

int write_fully(int fd, const void* data, size_t len) {
  iovec one{const_cast<void*>(data), len};
  return writev_fully(fd, &one, 1);
}

int write_column_frames(Recorder& r, int fd, char kind, uint64_t start, uint64_t end,
                        uint64_t* events) {
  thread_local std::vector<uint64_t> streams(EventLog::kChunkEvents);
  Recorder::PinnedRead pin(r, start, end);
  const EventLog::ReadPlan& plan = pin.plan();
  *events = plan.rows;
  int err = 0;
  for (size_t s = 0; !err && s < plan.slices.size(); ++s) {
    EventLog::ColumnView v = EventLog::columns_of(plan, s);
    if (v.n == 0) continue;
    // The stream column holds indexes into the recorder's stream table;
    // the frame carries the streams themselves.
    const uint64_t* stream = streams.data();
    auto stream_of = [&](uint16_t i) { return i < plan.streams.size() ? plan.streams[i] : 0; };
    bool stream_full = !all_equal(v.stream_idx, v.n);
    if (stream_full) {
      for (uint32_t i = 0; i < v.n; ++i) streams[i] = stream_of(v.stream_idx[i]);
    } else {
      streams[0] = stream_of(v.stream_idx[0]);
    }
    // In format::kColumns order: widest first, so full columns stay aligned.
    struct Column { const void* data; bool full; };
    Column columns[kColumns];
    namespace f = format;
    columns[f::kColTimestamp] = {v.timestamp, !all_equal(v.timestamp, v.n)};
    columns[f::kColAddress] = {v.address, !all_equal(v.address, v.n)};
    columns[f::kColSize] = {v.size, !all_equal(v.size, v.n)};
    columns[f::kColStream] = {stream, stream_full};
    columns[f::kColStep] = {v.step, !all_equal(v.step, v.n)};
    columns[f::kColThread] = {v.thread_id, !all_equal(v.thread_id, v.n)};
    columns[f::kColStack] = {v.stack_id, !all_equal(v.stack_id, v.n)};
    columns[f::kColType] = {v.type_id, !all_equal(v.type_id, v.n)};
    columns[f::kColDevice] = {v.device,
                              !all_equal(reinterpret_cast<const uint16_t*>(v.device), v.n)};
    columns[f::kColContext] = {v.context, !all_equal(v.context, v.n)};
    columns[f::kColKind] = {v.kind, !all_equal(v.kind, v.n)};
    unsigned char head[kFrameHead + kChunkHead] = {};
    iovec iov[1 + kColumns];
    uint64_t payload = kChunkHead;
    uint16_t mask = 0;
    for (int c = 0; c < kColumns; ++c) {
      size_t bytes = format::kColumns[c].width * (columns[c].full ? v.n : 1);
      // A constant column goes as its first value: one per chunk, not per event.
      iov[1 + c] = iovec{const_cast<void*>(columns[c].data), bytes};
      payload += bytes;
      if (columns[c].full) mask |= static_cast<uint16_t>(1u << c);
    }
    head[0] = static_cast<unsigned char>(kind);
    put_le(head + 1, payload, 8);
    put_le(head + kFrameHead, v.first_seq, 8);
    put_le(head + kFrameHead + 8, v.n, 4);
    put_le(head + kFrameHead + 12, mask, 2);
    put_le(head + kFrameHead + 16, v.allocated_before, 8);
    put_le(head + kFrameHead + 24, v.freed_before, 8);
    int64_t lo = v.timestamp[0], hi = v.timestamp[0];
    for (uint32_t i = 1; i < v.n; ++i) {
      lo = std::min(lo, v.timestamp[i]);
      hi = std::max(hi, v.timestamp[i]);
    }
    put_le(head + kFrameHead + 32, static_cast<uint64_t>(lo), 8);
    put_le(head + kFrameHead + 40, static_cast<uint64_t>(hi), 8);
    iov[0] = iovec{head, sizeof head};
    err = writev_fully(fd, iov, 1 + kColumns);
  }
  return err;
}

}  // namespace torchmem
