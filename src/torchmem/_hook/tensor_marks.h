// Marks in C (tensor_marks.cpp), for the autograd context hook module's method
// table and its forward hooks.
#pragma once

#include <Python.h>

namespace torchmem_marks {

// The interned names the functions below use; false on a Python error.
bool init();

// The referent of a weak reference, borrowed (its owner holds it); nullptr when
// it is gone or `ref` is not a weak reference.
PyObject* referent(PyObject* ref);

// storage_marks(list of (tensor, category, ctx)) -> list of (address, category, ctx).
PyObject* storage_marks(PyObject*, PyObject* marks);

// owned_marks(optimizer or None, owned, by_id) -> list or None.
PyObject* owned_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// fresh_marks(marks, found, sent, withdraw or None) -> (new, stale).
PyObject* fresh_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace torchmem_marks
