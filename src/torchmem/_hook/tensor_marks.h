// An optimizer step's marks in C (tensor_marks.cpp), for the autograd context
// hook module's method table.
#pragma once

#include <Python.h>

namespace torchmem_marks {

// The interned names the functions below use; false on a Python error.
bool init();

// owned_marks(optimizer or None, owned, by_id) -> list or None.
PyObject* owned_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// fresh_marks(marks, found, sent, withdraw or None) -> (new, stale).
PyObject* fresh_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace torchmem_marks
