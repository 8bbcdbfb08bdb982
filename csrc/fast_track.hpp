// The track_* methods on the Python hot path, written against the raw
// CPython API: a call costs one vectorcall and no temporary objects, which
// is what lets 1M allocation + free pairs from Python fit in 250 ms.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <memory>

#include "recorder.hpp"

namespace torchmem {

// What the Python-facing recorder object holds.
struct RecorderHandle {
  std::shared_ptr<Recorder> recorder;
  bool capture_stacks = false;
  int max_depth = 10;
  PyObject* type_ids = nullptr;  // dict: allocation type str -> int id

  explicit RecorderHandle(uint64_t retention);
  ~RecorderHandle();
  // Id for an allocation type string; -1 with a Python error set.
  int type_id_of(PyObject* name);
};

// Adds track_allocation / track_deallocation / track_reallocation to `type`,
// whose instances hold a RecorderHandle reached through `get`.
using HandleGetter = RecorderHandle* (*)(PyObject* self);
bool add_fast_methods(PyTypeObject* type, HandleGetter get);

}  // namespace torchmem
