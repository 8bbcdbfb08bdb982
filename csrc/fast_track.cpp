#include "fast_track.hpp"

#include <cstring>

#include "stack_capture.hpp"

namespace torchmem {

namespace {
HandleGetter g_get = nullptr;
constexpr long long kMaxValue = INT64_MAX;  // addresses, streams: int64 in files
// No device or host has 256 TiB; the bound also keeps every counter (a sum
// of sizes) far from wrapping.
constexpr long long kMaxSize = (1LL << 48) - 1;

// A parsed argument list: positional args first, then keywords by name.
struct Args {
  PyObject* values[5] = {nullptr, nullptr, nullptr, nullptr, nullptr};
};

bool parse(const char* fname, PyObject* const* args, Py_ssize_t nargs, PyObject* kwnames,
           const char* const* names, int n_names, int n_required, Args* out) {
  if (nargs > n_names) {
    PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname,
                 n_names, nargs);
    return false;
  }
  for (Py_ssize_t i = 0; i < nargs; ++i) out->values[i] = args[i];
  if (kwnames) {
    Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nk; ++k) {
      PyObject* key = PyTuple_GET_ITEM(kwnames, k);
      int slot = -1;
      for (int j = 0; j < n_names; ++j)
        if (PyUnicode_CompareWithASCIIString(key, names[j]) == 0) { slot = j; break; }
      if (slot < 0) {
        PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                     fname, key);
        return false;
      }
      if (out->values[slot]) {
        PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                     names[slot]);
        return false;
      }
      out->values[slot] = args[nargs + k];
    }
  }
  for (int j = 0; j < n_required; ++j)
    if (!out->values[j]) {
      PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                   names[j]);
      return false;
    }
  return true;
}

// A non-negative int (or an object with __index__, such as a numpy
// integer) up to `max_value`, or a TypeError / ValueError naming `what`.
bool to_u64(PyObject* obj, const char* what, uint64_t* out, long long max_value = kMaxValue) {
  PyObject* index = nullptr;
  if (!PyLong_Check(obj) || PyBool_Check(obj)) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj) || !(index = PyNumber_Index(obj))) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "%s must be an int, not %.100s", what,
                   Py_TYPE(obj)->tp_name);
      return false;
    }
    obj = index;
  }
  int overflow = 0;
  long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  bool failed = v == -1 && PyErr_Occurred();
  PyErr_Clear();
  bool ok = false;
  if (overflow > 0 || failed || v > max_value) {
    PyErr_Format(PyExc_ValueError, "%s must be at most %lld, got %R", what, max_value, obj);
  } else if (overflow < 0 || v < 0) {
    PyErr_Format(PyExc_ValueError, "%s must be >= 0, got %R", what, obj);
  } else {
    *out = static_cast<uint64_t>(v);
    ok = true;
  }
  Py_XDECREF(index);
  return ok;
}

bool to_device(PyObject* obj, int16_t* out) {
  PyObject* index = nullptr;
  if (!PyLong_Check(obj) || PyBool_Check(obj)) {
    if (PyBool_Check(obj) || !PyIndex_Check(obj) || !(index = PyNumber_Index(obj))) {
      PyErr_Clear();
      PyErr_Format(PyExc_TypeError, "device must be an int, not %.100s",
                   Py_TYPE(obj)->tp_name);
      return false;
    }
    obj = index;
  }
  long v = PyLong_AsLong(obj);
  bool ok = !(v == -1 && PyErr_Occurred()) && v >= -1 && v <= 32767;
  PyErr_Clear();
  if (ok) *out = static_cast<int16_t>(v);
  else PyErr_Format(PyExc_ValueError, "device must be -1 (host) or 0..32767, got %R", obj);
  Py_XDECREF(index);
  return ok;
}

uint32_t stack_for(const RecorderHandle& h) {
  return h.capture_stacks ? capture_python_stack(h.max_depth) : 0;
}

PyObject* track_allocation(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                           PyObject* kwnames) {
  RecorderHandle* h = g_get(self);
  if (!h) return nullptr;
  if (!h->recorder->enabled()) Py_RETURN_NONE;
  static const char* const names[] = {"address", "size_bytes", "allocation_type",
                                      "device", "stream"};
  Args a;
  // Fast path: all positional (the common call from loops and sources).
  if (!kwnames && nargs >= 2 && nargs <= 5) {
    for (Py_ssize_t i = 0; i < nargs; ++i) a.values[i] = args[i];
  } else if (!parse("track_allocation", args, nargs, kwnames, names, 5, 2, &a)) {
    return nullptr;
  }
  PyObject* const* v = a.values;
  uint64_t address, size, stream = 0;
  int16_t device = -1;
  int type = kTypeCPU;
  if (!to_u64(v[0], "address", &address) || !to_u64(v[1], "size_bytes", &size, kMaxSize))
    return nullptr;
  if (v[2] && (type = h->type_id_of(v[2])) < 0) return nullptr;
  if (v[3] && !to_device(v[3], &device)) return nullptr;
  if (v[4] && !to_u64(v[4], "stream", &stream)) return nullptr;
  h->recorder->record_alloc(address, size, static_cast<uint16_t>(type), device, stream,
                            stack_for(*h));
  Py_RETURN_NONE;
}

PyObject* track_deallocation(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames) {
  RecorderHandle* h = g_get(self);
  if (!h) return nullptr;
  if (!h->recorder->enabled()) Py_RETURN_NONE;
  static const char* const names[] = {"address", "size_bytes"};
  Args a;
  if (kwnames || nargs != 1) {
    if (!parse("track_deallocation", args, nargs, kwnames, names, 2, 1, &a)) return nullptr;
  } else {
    a.values[0] = args[0];
  }
  uint64_t address, size = 0;
  if (!to_u64(a.values[0], "address", &address)) return nullptr;
  bool sized = a.values[1] && a.values[1] != Py_None;
  if (sized && !to_u64(a.values[1], "size_bytes", &size, kMaxSize)) return nullptr;
  h->recorder->record_free(address, sized ? static_cast<int64_t>(size) : -1);
  Py_RETURN_NONE;
}

PyObject* track_reallocation(PyObject* self, PyObject* const* args, Py_ssize_t nargs,
                             PyObject* kwnames) {
  RecorderHandle* h = g_get(self);
  if (!h) return nullptr;
  if (!h->recorder->enabled()) Py_RETURN_NONE;
  static const char* const names[] = {"old_address", "new_address", "new_size_bytes"};
  Args a;
  if (!parse("track_reallocation", args, nargs, kwnames, names, 3, 3, &a)) return nullptr;
  uint64_t old_address, new_address, size;
  if (!to_u64(a.values[0], "old_address", &old_address) ||
      !to_u64(a.values[1], "new_address", &new_address) ||
      !to_u64(a.values[2], "new_size_bytes", &size, kMaxSize))
    return nullptr;
  h->recorder->record_realloc(old_address, new_address, size, stack_for(*h));
  Py_RETURN_NONE;
}

PyMethodDef g_methods[] = {
    {"track_allocation", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(track_allocation)),
     METH_FASTCALL | METH_KEYWORDS,
     "track_allocation(address, size_bytes, allocation_type='CPU', device=-1, stream=0)\n"
     "Record an allocation of `size_bytes` bytes at `address`."},
    {"track_deallocation", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(track_deallocation)),
     METH_FASTCALL | METH_KEYWORDS,
     "track_deallocation(address, size_bytes=None)\n"
     "Record the free of the allocation at `address`; an unknown address or a\n"
     "second free is counted as an anomaly, never raised."},
    {"track_reallocation", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(track_reallocation)),
     METH_FASTCALL | METH_KEYWORDS,
     "track_reallocation(old_address, new_address, new_size_bytes)\n"
     "Record that the allocation at `old_address` moved to `new_address` with\n"
     "`new_size_bytes` bytes (one REALLOCATION event, after the old free)."},
};
}  // namespace

RecorderHandle::RecorderHandle(uint64_t retention)
    : recorder(std::make_shared<Recorder>(retention)), type_ids(PyDict_New()) {}

RecorderHandle::~RecorderHandle() { Py_XDECREF(type_ids); }

int RecorderHandle::type_id_of(PyObject* name) {
  if (!PyUnicode_Check(name)) {
    PyErr_Format(PyExc_TypeError, "allocation_type must be a str, not %.100s",
                 Py_TYPE(name)->tp_name);
    return -1;
  }
  PyObject* cached = PyDict_GetItemWithError(type_ids, name);  // borrowed
  if (cached) return static_cast<int>(PyLong_AsLong(cached));
  if (PyErr_Occurred()) return -1;
  Py_ssize_t n = 0;
  const char* text = PyUnicode_AsUTF8AndSize(name, &n);
  if (!text) return -1;
  // The limit is in characters (code points), as the message says; the
  // UTF-8 bytes of 64 of them are at most 256.
  Py_ssize_t chars = PyUnicode_GetLength(name);
  if (chars == 0 || chars > 64) {
    PyErr_Format(PyExc_ValueError, "allocation_type must be 1 to 64 characters, got %R",
                 name);
    return -1;
  }
  uint16_t id = recorder->type_id(std::string(text, static_cast<size_t>(n)));
  if (id == kTypeNone) {
    PyErr_SetString(PyExc_ValueError, "too many distinct allocation types (65535)");
    return -1;
  }
  PyObject* value = PyLong_FromLong(id);
  if (!value || PyDict_SetItem(type_ids, name, value) < 0) {
    Py_XDECREF(value);
    return -1;
  }
  Py_DECREF(value);
  return id;
}

bool add_fast_methods(PyTypeObject* type, HandleGetter get) {
  g_get = get;
  for (PyMethodDef& def : g_methods) {
    PyObject* descr = PyDescr_NewMethod(type, &def);
    if (!descr) return false;
    int rc = PyObject_SetAttrString(reinterpret_cast<PyObject*>(type), def.ml_name, descr);
    Py_DECREF(descr);
    if (rc < 0) return false;
  }
  PyType_Modified(type);
  return true;
}

}  // namespace torchmem
