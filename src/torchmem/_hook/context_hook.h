// What the autograd context hook module's two halves share: the node claims
// and context functions (autograd_context_hook.cpp), and the module forward
// paths (module_forward.cpp) that call them.
#pragma once

#include <Python.h>

#include <cstdint>

namespace torchmem_hook {

using SetContextFn = void (*)(uint16_t);
using GetContextFn = uint16_t (*)();

// The recorder's per-thread context (install() sets them; null before).
extern SetContextFn g_set_context;
extern GetContextFn g_get_context;

// Claims the node of one tensor for ctx; false when there is nothing to claim.
bool claim_one(PyObject* obj, uint16_t ctx);
// The nodes of the tensors directly in a tuple or list; how many it claimed.
long claim_items(PyObject* v, uint16_t ctx);

// module_forward.cpp: its interned names (false on a Python error), and the
// functions of the method table.
bool forward_init();
PyObject* forward_enter(PyObject*, PyObject* const* a, Py_ssize_t nargs);
PyObject* forward_exit(PyObject*, PyObject* const* a, Py_ssize_t nargs);
PyObject* bind_thread(PyObject*, PyObject* stack);
PyObject* use_roots(PyObject*, PyObject* roots);

}  // namespace torchmem_hook
