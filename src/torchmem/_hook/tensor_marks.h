// Marks in C (tensor_marks.cpp), for the autograd context hook module's method
// table and its forward hooks.
#pragma once

#include <Python.h>

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchmem_marks {

// The interned names the functions below use; false on a Python error.
bool init();

// The referent of a weak reference, borrowed (its owner holds it); nullptr when
// it is gone or `ref` is not a weak reference.
PyObject* referent(PyObject* ref);

// The start of a tensor's storage memory; 0 when it has none (a meta or
// sparse tensor, or a subclass without storage).
uintptr_t storage_address(const at::Tensor& t);

// Appends (address, category, ctx) to the list out unless the tensor has no
// storage memory; false on a Python error.
bool append_tensor(PyObject* out, const at::Tensor& t, PyObject* category, PyObject* ctx);

// storage_marks(list of (tensor, category, ctx)) -> list of (address, category, ctx).
PyObject* storage_marks(PyObject*, PyObject* marks);

// owned_marks(optimizer or None, owned, by_id) -> list or None.
PyObject* owned_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

// fresh_marks(marks, found, sent, withdraw or None) -> (new, stale).
PyObject* fresh_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs);

}  // namespace torchmem_marks
