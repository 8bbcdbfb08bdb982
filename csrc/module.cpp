// torchmem._native: the Python face of the recorder. Everything but the
// track_* hot path (fast_track.cpp) is bound with nanobind; bulk data (events,
// live allocations) leaves as bytes that numpy views without a copy per row.
#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/vector.h>

#include <cerrno>
#include <cstring>

#include "context_table.hpp"
#include "fast_track.hpp"
#include "host_bridge.hpp"
#include "recorder.hpp"
#include "stack_capture.hpp"
#include "trace_format.hpp"
#include "trace_frames.hpp"

namespace nb = nanobind;
using namespace torchmem;

namespace {

// The live-allocation row Python reads (LIVE_DTYPE in _events.py).
struct LiveRow {
  uint64_t address;
  uint64_t size;
  int64_t timestamp_ns;
  uint64_t seq;
  uint64_t stream;
  uint32_t step;
  uint32_t stack_id;
  uint32_t thread_id;
  uint16_t type_id;
  int16_t device;
  uint16_t context_id;
  uint8_t pad[6];
};
static_assert(sizeof(LiveRow) == 64, "LiveRow is a numpy layout");

using CounterTuple = std::tuple<uint64_t, uint64_t, uint64_t, uint64_t, uint64_t, uint64_t>;
CounterTuple as_tuple(const Counters& c) {
  return {c.allocated, c.freed, c.current, c.peak, c.alloc_count, c.free_count};
}

template <typename T>
nb::bytes as_bytes(const std::vector<T>& rows) {
  return nb::bytes(reinterpret_cast<const char*>(rows.data()), rows.size() * sizeof(T));
}

PyTypeObject* g_recorder_type = nullptr;

RecorderHandle* handle_of(PyObject* self) {
  nb::handle h(self);
  // PyObject_TypeCheck against the cached type: nb::isinstance would look
  // the C++ type up in a hash table on every track_* call.
  if (!PyObject_TypeCheck(self, g_recorder_type) || !nb::inst_ready(h)) {
    PyErr_SetString(PyExc_TypeError, "recorder is not initialised (missing __init__ call?)");
    return nullptr;
  }
  return nb::inst_ptr<RecorderHandle>(h);
}

Recorder& rec(RecorderHandle& h) { return *h.recorder; }

// format:: as plain Python values: what scripts/gen_trace_format.py writes
// into src/torchmem/_trace_format.py, and what that module is checked against.
nb::dict trace_format_dict() {
  using namespace format;
  auto fields = [](const Field* begin, size_t n) {
    nb::list out;
    for (size_t i = 0; i < n; ++i) out.append(nb::make_tuple(begin[i].name, begin[i].code));
    return out;
  };
  nb::dict d;
  d["chunk_events"] = kChunkEvents;
  d["frame_header"] = kFrameHeaderStruct;
  nb::dict kinds;
  for (const FrameKind& k : kFrameKinds) kinds[k.name] = std::string(1, k.kind);
  d["frame_kinds"] = kinds;
  nb::dict layouts;
  layouts["rows"] = kLayoutRows;
  layouts["columns_v1"] = kLayoutColumnsV1;
  layouts["columns"] = kLayoutColumns;
  d["layouts"] = layouts;
  d["row_fields"] = fields(kRowFields, kRowFieldCount);
  d["row_bytes"] = kRowBytes;
  d["columns_header"] = fields(kColumnsHeader, sizeof(kColumnsHeader) / sizeof(Field));
  d["columns"] = fields(kColumns, kColumnCount);
  d["columns_v1_count"] = kColumnsV1Count;
  nb::list event_kinds;
  for (const char* k : {"ALLOCATION", "DEALLOCATION", "REALLOCATION", "SNAPSHOT", "GC_START",
                        "GC_END", "OUT_OF_MEMORY"})
    event_kinds.append(k);
  d["event_kinds"] = event_kinds;
  nb::list phases;
  for (const char* p : kPhases) phases.append(p);
  d["phases"] = phases;
  d["type_none"] = kTypeNone;
  return d;
}

void raise_if_errno(int err) {
  if (!err) return;
  errno = err;
  PyErr_SetFromErrno(PyExc_OSError);
  throw nb::python_error();
}

}  // namespace

void bind_cuda(nanobind::module_& m);  // csrc/cuda_bindings.cpp
void bind_heap_walk(nanobind::module_& m);  // csrc/heap_walk.cpp
void bind_stacks(nanobind::module_& m);  // csrc/stack_bindings.cpp

NB_MODULE(_native, m) {
  m.doc() = "torchmem's native recorder (C++): live map, counters, event log, stacks.";
  // The process-wide profiler lives until the interpreter is gone, by
  // design; nanobind would report it (and every binding) as leaked.
  nb::set_leak_warnings(false);

  m.attr("EVENT_ROW_BYTES") = sizeof(EventRow);
  m.attr("LIVE_ROW_BYTES") = sizeof(LiveRow);
  m.attr("CHUNK_EVENTS") = EventLog::kChunkEvents;
  m.def("trace_format", &trace_format_dict,
        "The trace format's constants (csrc/trace_format.hpp) as plain values.");

  auto cls = nb::class_<RecorderHandle>(m, "Recorder")
      .def(nb::init<uint64_t>(), nb::arg("retention_events") = uint64_t{1} << 20)
      .def_prop_rw("enabled", [](RecorderHandle& h) { return rec(h).enabled(); },
                   [](RecorderHandle& h, bool on) { rec(h).set_enabled(on); })
      .def_prop_rw("_capture_stacks", [](RecorderHandle& h) { return h.capture_stacks; },
                   [](RecorderHandle& h, bool on) { h.capture_stacks = on; })
      .def_prop_rw("_max_depth", [](RecorderHandle& h) { return h.max_depth; },
                   [](RecorderHandle& h, int d) { h.max_depth = d; })
      .def_prop_ro("_retention", [](RecorderHandle& h) { return rec(h).retention(); })
      .def("_get_step", [](RecorderHandle& h) { return rec(h).step(); })
      .def("_advance_step", [](RecorderHandle& h) { return rec(h).advance_step(); })
      .def("_set_step", [](RecorderHandle& h, uint64_t s) { rec(h).set_step(s); })
      .def("_counters",
           [](RecorderHandle& h, std::optional<int> type_id, std::optional<int> device) {
             Recorder& r = rec(h);
             if (type_id && device)
               return as_tuple(r.for_type_device(static_cast<uint16_t>(*type_id),
                                                 static_cast<int16_t>(*device)));
             if (type_id) return as_tuple(r.for_type(static_cast<uint16_t>(*type_id)));
             if (device) return as_tuple(r.for_device(static_cast<int16_t>(*device)));
             return as_tuple(r.total());
           },
           nb::arg("type_id") = nb::none(), nb::arg("device") = nb::none())
      .def("_per_type", [](RecorderHandle& h) {
             std::vector<std::pair<int, CounterTuple>> out;
             for (auto& [t, c] : rec(h).per_type()) out.emplace_back(t, as_tuple(c));
             return out;
           })
      .def("_per_device", [](RecorderHandle& h) {
             std::vector<std::pair<int, CounterTuple>> out;
             for (auto& [d, c] : rec(h).per_device()) out.emplace_back(d, as_tuple(c));
             return out;
           })
      .def("_reset_peak", [](RecorderHandle& h, int t, int d) { rec(h).reset_peak(t, d); },
           nb::arg("type_id") = -1, nb::arg("device") = -2)
      .def("_type_names", [](RecorderHandle& h) { return rec(h).type_names(); })
      .def("_type_id", [](RecorderHandle& h, nb::handle name) {
             int id = h.type_id_of(name.ptr());
             if (id < 0) throw nb::python_error();
             return id;
           })
      .def("_read_events", [](RecorderHandle& h, uint64_t a, uint64_t b) {
             // Rows are built straight into the bytes object, without the
             // GIL and without the recorder's lock: training threads keep
             // allocating while a sink reads.
             Recorder::PinnedRead pin(rec(h), a, b);
             PyObject* out = PyBytes_FromStringAndSize(
                 nullptr, static_cast<Py_ssize_t>(pin.plan().rows * sizeof(EventRow)));
             if (!out) throw nb::python_error();
             {
               nb::gil_scoped_release release;
               EventLog::fill(pin.plan(), reinterpret_cast<EventRow*>(PyBytes_AS_STRING(out)));
             }
             return nb::steal<nb::bytes>(out);
           })
      .def("_write_event_columns", [](RecorderHandle& h, int fd, uint64_t a, uint64_t b,
                                      nb::bytes kind) {
             if (kind.size() != 1) throw nb::value_error("kind must be one byte");
             char k = kind.c_str()[0];
             uint64_t events = 0;
             int err = 0;
             {
               nb::gil_scoped_release release;
               err = write_column_frames(rec(h), fd, k, a, b, &events);
             }
             raise_if_errno(err);
             return events;
           }, nb::arg("fd"), nb::arg("start_seq"), nb::arg("end_seq"), nb::arg("kind"),
           "Writes events [start_seq, end_seq) to `fd` as COLUMNS frames of the SQLite "
           "writer's protocol (`kind`, payload length u64 LE, one column chunk), one per "
           "event-log chunk. Returns the event count (no frame when 0).")
      .def("_next_seq", [](RecorderHandle& h) { return rec(h).next_seq(); })
      .def("_first_retained_seq", [](RecorderHandle& h) { return rec(h).first_retained_seq(); })
      .def("_seq_range_for_steps",
           [](RecorderHandle& h, uint64_t lo, uint64_t hi) {
             return rec(h).seq_range_for_steps(lo, hi);
           })
      .def("_first_seq_at_or_after_time",
           [](RecorderHandle& h, int64_t ts) { return rec(h).first_seq_at_or_after_time(ts); })
      .def("_set_consumer_seq", [](RecorderHandle& h, uint64_t s) { rec(h).set_consumer_seq(s); })
      .def("_live", [](RecorderHandle& h) {
             std::vector<uint64_t> streams;
             std::vector<LiveEntry> entries = rec(h).live(&streams);
             std::vector<LiveRow> rows;
             rows.reserve(entries.size());
             for (const LiveEntry& e : entries)
               rows.push_back(LiveRow{e.address, e.size, e.timestamp_ns, e.seq,
                                      e.stream_idx < streams.size() ? streams[e.stream_idx] : 0,
                                      e.step, e.stack_id, e.thread_id, e.type_id, e.device,
                                      e.context, {}});
             return as_bytes(rows);
           })
      .def("_live_count", [](RecorderHandle& h) { return rec(h).live_count(); })
      .def("_peak_seq", [](RecorderHandle& h) { return rec(h).peak_seq(); })
      .def("_live_seqs", [](RecorderHandle& h, const std::vector<uint64_t>& addresses) {
             // Per address (seq, context) of its live allocation; seq
             // UINT64_MAX for one that is not live. One lock for all.
             size_t n = addresses.size();
             std::vector<uint64_t> seqs(n);
             std::vector<uint16_t> ctx(n);
             rec(h).live_seqs(addresses.data(), n, seqs.data(), ctx.data());
             std::vector<std::pair<uint64_t, uint16_t>> out(n);
             for (size_t i = 0; i < n; ++i) out[i] = {seqs[i], ctx[i]};
             return out;
           })
      .def("_anomaly_counts", [](RecorderHandle& h) {
             nb::dict out;
             std::vector<uint64_t> counts = rec(h).anomaly_counts();
             for (int k = 0; k < kAnomalyKinds; ++k)
               out[anomaly_name(static_cast<AnomalyKind>(k))] = counts[k];
             return out;
           })
      .def("_anomaly_examples", [](RecorderHandle& h) {
             nb::list out;
             for (const AnomalyExample& e : rec(h).anomaly_examples()) {
               nb::dict d;
               d["kind"] = anomaly_name(e.kind);
               d["address"] = e.address;
               d["size_bytes"] = e.size;
               d["expected_size_bytes"] = e.expected;
               d["seq"] = e.seq;
               d["timestamp_ns"] = e.timestamp_ns;
               d["thread_id"] = e.thread_id;
               out.append(d);
             }
             return out;
           })
      .def("_record_anomaly",
           [](RecorderHandle& h, int kind, uint64_t address, uint64_t size) {
             if (kind < 0 || kind >= kAnomalyKinds) throw nb::value_error("bad anomaly kind");
             rec(h).record_anomaly(static_cast<AnomalyKind>(kind), address, size, 0);
           })
      .def("_record_marker",
           [](RecorderHandle& h, int kind, uint64_t payload, uint64_t size) {
             if (kind < static_cast<int>(EventKind::Snapshot) ||
                 kind > static_cast<int>(EventKind::GcEnd))
               throw nb::value_error("markers are SNAPSHOT, GC_START or GC_END");
             return rec(h).record_marker(static_cast<EventKind>(kind), payload, size);
           })
      .def("_record_oom",
           [](RecorderHandle& h, uint64_t requested, int device, uint64_t stream,
              uint64_t device_free, uint64_t device_total, nb::handle type_name) {
             int type = type_name.is_none() ? kTypeGPU : h.type_id_of(type_name.ptr());
             if (type < 0) throw nb::python_error();
             OomInfo info{};
             info.requested = requested;
             info.device = static_cast<int16_t>(device);
             info.stream = stream;
             info.device_free = device_free;
             info.device_total = device_total;
             info.stack_id = h.capture_stacks ? capture_python_stack(h.max_depth) : 0;
             rec(h).record_oom(info, static_cast<uint16_t>(type));
           },
           nb::arg("requested"), nb::arg("device"), nb::arg("stream") = 0,
           nb::arg("device_free") = 0, nb::arg("device_total") = 0,
           nb::arg("allocation_type") = nb::none())
      .def("_oom_events", [](RecorderHandle& h) {
             nb::list out;
             for (const OomInfo& o : rec(h).oom_events()) {
               nb::dict d;
               d["seq"] = o.seq;
               d["timestamp_ns"] = o.timestamp_ns;
               d["requested_bytes"] = o.requested;
               d["device"] = o.device;
               d["stream"] = o.stream;
               d["device_free_bytes"] = o.device_free;
               d["device_total_bytes"] = o.device_total;
               d["live_bytes"] = o.live_bytes;
               d["stack_id"] = o.stack_id;
               out.append(d);
             }
             return out;
           })
      .def("_replay", [](RecorderHandle& h, nb::handle rows) {
             // Any C-contiguous buffer: copying 10M events to bytes cost 0.25 s.
             struct View { Py_buffer b; ~View() { PyBuffer_Release(&b); } };
             View view{};  // obj null: Release is a no-op if GetBuffer fails
             if (PyObject_GetBuffer(rows.ptr(), &view.b, PyBUF_C_CONTIGUOUS) != 0)
               throw nb::python_error();
             const size_t size = size_t(view.b.len);
             const char* p = static_cast<const char*>(view.b.buf);
             if (size % sizeof(EventRow) != 0)
               throw nb::value_error("event rows must be a multiple of 80 bytes");
             for (size_t i = 0; i < size / sizeof(EventRow); ++i) {
               EventRow row;
               std::memcpy(&row, p + i * sizeof(EventRow), sizeof(EventRow));
               rec(h).replay(row);
             }
           })
      .def("_memory_bytes", [](RecorderHandle& h) { return rec(h).memory_bytes(); });

  g_recorder_type = reinterpret_cast<PyTypeObject*>(cls.ptr());
  if (!add_fast_methods(reinterpret_cast<PyTypeObject*>(cls.ptr()), handle_of))
    throw nb::python_error();

  m.def("stack_nodes_since", [](uint32_t first) {
    return as_bytes(stack_table().nodes_since(first));
  }, "Prefix-tree nodes from `first` on as (parent u32, frame u32) pairs.");
  m.def("set_context", [](uint16_t id) { set_current_context(id); }, nb::arg("context_id"),
        "Sets the calling thread's attribution context (0 = none); every event it "
        "records from now on carries it.");
  m.def("context_fn_addresses", [] {
    return std::make_pair(reinterpret_cast<uintptr_t>(&torchmem_set_context),
                          reinterpret_cast<uintptr_t>(&torchmem_get_context));
  }, "Addresses of the C functions void(uint16_t) setting and uint16_t() reading the "
     "calling thread's context (for the autograd node hooks built against torch at run "
     "time).");
  m.def("get_context", [] { return current_context(); },
        "The calling thread's attribution context id.");
  m.def("intern_context", [](const std::string& module, int phase) {
    if (phase < 0 || phase >= format::kPhaseCount) throw nb::value_error("bad phase");
    return context_table().intern(module, static_cast<uint8_t>(phase));
  }, nb::arg("module"), nb::arg("phase"),
     "Id of the context (module path, phase index); 0 once the table is full.");
  m.def("contexts_since", [](uint32_t first) {
    std::vector<std::pair<std::string, int>> out;
    for (const ContextInfo& c : context_table().since(first)) out.emplace_back(c.module, c.phase);
    return out;
  }, nb::arg("first"), "Interned contexts from id `first` on: (module path, phase index).");
  // None, or a Recorder (a MemoryProfiler): the recorder an allocator hook feeds.
  auto recorder_or_null = [](nb::handle recorder) -> std::shared_ptr<Recorder> {
    if (recorder.is_none()) return nullptr;
    RecorderHandle* h = handle_of(recorder.ptr());
    if (!h) throw nb::python_error();
    return h->recorder;
  };
  m.def("set_gpu_recorder", [recorder_or_null](nb::handle recorder) {
    set_gpu_recorder(recorder_or_null(recorder));
  }, nb::arg("recorder").none(), "The profiler the CUDA plugin feeds (None: none).");
  m.def("set_host_recorder", [recorder_or_null](nb::handle recorder) {
    set_host_recorder(recorder_or_null(recorder));
  }, nb::arg("recorder").none(), "The profiler the CPU allocator hook feeds (None: none).");
  m.def("write_all", [](int fd, nb::handle data) {
    // One GIL release for the whole buffer: a Python loop over os.write
    // takes the GIL back after every partial write into a full pipe, and
    // each time the training thread has to hand it over.
    Py_buffer view;
    if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_SIMPLE) != 0) throw nb::python_error();
    int err = 0;
    {
      nb::gil_scoped_release unlocked;
      err = write_fully(fd, view.buf, static_cast<size_t>(view.len));
    }
    PyBuffer_Release(&view);
    raise_if_errno(err);
  }, nb::arg("fd"), nb::arg("data"),
     "Writes all of `data` (a contiguous buffer) to `fd` with the GIL released; OSError on failure.");
  m.def("host_bridge_addresses", [] {
    return std::make_pair(host_alloc_fn_address(), host_free_fn_address());
  }, "Addresses of torchmem_host_alloc and torchmem_host_free, for the CPU allocator hook.");
  bind_cuda(m);
  bind_heap_walk(m);
  bind_stacks(m);
}
