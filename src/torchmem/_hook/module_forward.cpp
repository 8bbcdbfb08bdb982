// The module forward paths in C++ (context.py's _Hooks.forward_pre/post, which
// sources/_module_call.py runs around every module call): the same stack
// entries, contexts, node claims and input marks as the Python paths, without
// their bytecode.
//
// Two cases are done here, on a thread that claims nodes with this module:
// - a module called inside a running module whose anchor already names it
//   (about 6,800 instructions a module call less, callgrind);
// - an outermost module that ran before (its entry in the roots dict that
//   context.py fills, use_roots): its Python enter and exit were about
//   29,000 instructions a forward on a small MLP, most of it the input marks.
// Anything else (a module not named yet, an outermost module seen for the
// first time, a frame that is not on top, inputs nested deeper than one
// level) returns False having changed nothing, and the Python paths do it.
// These functions never raise: an unexpected object is a False.

#include <Python.h>

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/python_variable.h>
#include <c10/core/GradMode.h>

#include "context_hook.h"
#include "tensor_marks.h"

#include <cstdint>

namespace {

using namespace torchmem_hook;

PyObject* g_thread_key = nullptr;  // fast_stack's entry in the per-thread dict
PyObject* g_name_names = nullptr;
PyObject* g_input = nullptr;       // the category "input"
PyObject* g_zero = nullptr;
// id(module) -> (weakref, anchor, (fwd ctx, bwd ctx, path)) of the outermost
// modules that ran (context.py's _Hooks.root_entries), or null.
PyObject* g_roots = nullptr;

// A context id held by a Python int; false when it is not one.
bool context_arg(PyObject* v, uint16_t* out) {
  if (!PyLong_CheckExact(v)) return false;
  unsigned long x = PyLong_AsUnsignedLong(v);
  if (x > 0xFFFF) return false;  // also -1 on error
  *out = uint16_t(x);
  return true;
}

bool refers_to(PyObject* ref, PyObject* obj) {
  return torchmem_marks::referent(ref) == obj;
}

// The calling thread's running-module list (context.py's _Thread.stack) while
// that thread claims nodes with this module (bind_thread), borrowed; else
// nullptr. Kept in the interpreter's per-thread dict, which goes with the
// thread: a lookup there costs a tenth of a threading.local attribute.
PyObject* fast_stack() {
  PyObject* dict = PyThreadState_GetDict();
  if (dict == nullptr) return nullptr;
  PyObject* stack = PyDict_GetItemWithError(dict, g_thread_key);
  return stack != nullptr && PyList_CheckExact(stack) ? stack : nullptr;
}

// A stack frame: (module, context before, anchor, (fwd, bwd, path), is outermost).
bool is_frame(PyObject* f) {
  return PyTuple_CheckExact(f) && PyTuple_GET_SIZE(f) == 5 &&
         PyTuple_CheckExact(PyTuple_GET_ITEM(f, 3)) && PyTuple_GET_SIZE(PyTuple_GET_ITEM(f, 3)) == 3;
}

// Whether an item is a container the Python paths' tensors_in walks into.
bool nested(PyObject* v) {
  return PyTuple_Check(v) || PyList_Check(v) || PyDict_Check(v);
}

// Whether the Python paths' tensors_in(value) is value's own items: a tuple or
// list holding no tuple, list or dict.
bool flat(PyObject* v) {
  if (!PyTuple_Check(v) && !PyList_Check(v)) return false;
  Py_ssize_t len = PySequence_Fast_GET_SIZE(v);
  PyObject** items = PySequence_Fast_ITEMS(v);
  for (Py_ssize_t i = 0; i < len; ++i)
    if (nested(items[i])) return false;
  return true;
}

// Whether _marks.input_marks(args, kwargs) would find only the tensors directly
// in args and in kwargs' values (kwargs None: a forward that raised).
bool flat_inputs(PyObject* args, PyObject* kwargs) {
  if (!PyTuple_CheckExact(args) || !flat(args)) return false;
  if (kwargs == Py_None) return true;
  if (!PyDict_Check(kwargs)) return false;
  PyObject *key, *value;
  Py_ssize_t pos = 0;
  while (PyDict_Next(kwargs, &pos, &key, &value))
    if (nested(value)) return false;
  return true;
}

// Appends (storage address, "input", 0) for a tensor with storage memory (as
// _marks.storage_marks); false on a Python error.
bool append_input(PyObject* out, PyObject* obj) {
  if (!THPVariable_Check(obj)) return true;
  return torchmem_marks::append_tensor(out, THPVariable_Unpack(obj), g_input, g_zero);
}

// The input marks of flat inputs (flat_inputs), as a new list; nullptr on a
// Python error.
PyObject* input_marks(PyObject* args, PyObject* kwargs) {
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(args); ++i)
    if (!append_input(out, PyTuple_GET_ITEM(args, i))) {
      Py_DECREF(out);
      return nullptr;
    }
  if (kwargs != Py_None) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(kwargs, &pos, &key, &value))
      if (!append_input(out, value)) {
        Py_DECREF(out);
        return nullptr;
      }
  }
  return out;
}

// Pushes (module, context now, anchor, ctx, root) and sets the module's forward
// or backward context; false (nothing changed) on an unexpected object.
bool push(PyObject* stack, PyObject* module, PyObject* anchor, PyObject* ctx, PyObject* root,
          bool in_backward) {
  uint16_t fwd, bwd;
  if (!context_arg(PyTuple_GET_ITEM(ctx, 0), &fwd) || !context_arg(PyTuple_GET_ITEM(ctx, 1), &bwd))
    return false;
  PyObject* prev = PyLong_FromLong(g_get_context());
  if (prev == nullptr) return false;
  PyObject* frame = PyTuple_Pack(5, module, prev, anchor, ctx, root);
  Py_DECREF(prev);
  if (frame == nullptr) return false;
  int rc = PyList_Append(stack, frame);
  Py_DECREF(frame);
  if (rc != 0) return false;
  g_set_context(in_backward ? bwd : fwd);
  return true;
}

// An outermost module that ran before: its entry in the roots dict.
bool enter_root(PyObject* stack, PyObject* module, bool in_backward) {
  if (g_roots == nullptr) return false;
  PyObject* key = PyLong_FromVoidPtr(module);
  if (key == nullptr) return false;
  PyObject* entry = PyDict_GetItemWithError(g_roots, key);  // (weakref, anchor, ctx)
  Py_DECREF(key);
  if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) return false;
  PyObject* ctx = PyTuple_GET_ITEM(entry, 2);
  if (!PyTuple_CheckExact(ctx) || PyTuple_GET_SIZE(ctx) != 3) return false;
  if (!refers_to(PyTuple_GET_ITEM(entry, 0), module)) return false;
  return push(stack, module, PyTuple_GET_ITEM(entry, 1), ctx, Py_True, in_backward);
}

// A module inside a running module whose anchor names it.
bool enter_child(PyObject* stack, PyObject* top, PyObject* module, PyObject* args,
                 bool in_backward) {
  PyObject* anchor = PyTuple_GET_ITEM(top, 2);
  if (anchor == Py_None) return false;  // an optimizer step's frame
  PyObject* names = PyObject_GetAttr(anchor, g_name_names);
  if (names == nullptr) return false;
  bool done = false;
  PyObject* key = nullptr;
  do {
    if (!PyDict_CheckExact(names)) break;
    key = PyLong_FromVoidPtr(module);
    if (key == nullptr) break;
    PyObject* entry = PyDict_GetItemWithError(names, key);  // (weakref, ctx, path)
    if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) break;
    PyObject* ctx = PyTuple_GET_ITEM(entry, 1);
    if (!PyTuple_CheckExact(ctx) || PyTuple_GET_SIZE(ctx) != 3) break;  // not interned yet
    if (!refers_to(PyTuple_GET_ITEM(entry, 0), module)) break;
    uint16_t caller_bwd;
    if (!context_arg(PyTuple_GET_ITEM(PyTuple_GET_ITEM(top, 3), 1), &caller_bwd)) break;
    if (!push(stack, module, anchor, ctx, Py_False, in_backward)) break;
    done = true;
    // Inputs made by the caller's own ops: the caller's context holds again
    // once this module's backward is done.
    if (!in_backward && c10::GradMode::is_enabled() && PyTuple_Check(args) &&
        PyTuple_GET_SIZE(args) > 0) {
      try {
        claim_items(args, caller_bwd);
      } catch (const std::exception&) {
        // as the Python paths: never into the training run
      }
    }
  } while (false);
  Py_XDECREF(key);
  Py_DECREF(names);
  return done;
}

}  // namespace

namespace torchmem_hook {

bool forward_init() {
  g_thread_key = PyUnicode_InternFromString("torchmem.context.stack");
  g_name_names = PyUnicode_InternFromString("names");
  g_input = PyUnicode_InternFromString("input");
  g_zero = PyLong_FromLong(0);
  return g_thread_key && g_name_names && g_input && g_zero;
}

// bind_thread(stack or None): the calling thread's stack, for the fast paths
// (context.py's _Thread.claim setter, when the thread switches to or from
// this module's claim()).
PyObject* bind_thread(PyObject*, PyObject* stack) {
  PyObject* dict = PyThreadState_GetDict();
  if (dict == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "no thread state dict");
    return nullptr;
  }
  if (stack == Py_None) {
    if (PyDict_DelItem(dict, g_thread_key) != 0) {
      if (!PyErr_ExceptionMatches(PyExc_KeyError)) return nullptr;
      PyErr_Clear();
    }
    Py_RETURN_NONE;
  }
  if (!PyList_CheckExact(stack)) {
    PyErr_SetString(PyExc_TypeError, "bind_thread(list or None)");
    return nullptr;
  }
  if (PyDict_SetItem(dict, g_thread_key, stack) != 0) return nullptr;
  Py_RETURN_NONE;
}

// use_roots(dict or None): where the outermost modules' entries are.
PyObject* use_roots(PyObject*, PyObject* roots) {
  if (roots != Py_None && !PyDict_CheckExact(roots)) {
    PyErr_SetString(PyExc_TypeError, "use_roots(dict or None)");
    return nullptr;
  }
  if (roots == Py_None) {
    Py_CLEAR(g_roots);
  } else {
    Py_INCREF(roots);
    Py_XSETREF(g_roots, roots);
  }
  Py_RETURN_NONE;
}

// forward_enter(module, args) -> bool: forward_pre done here.
PyObject* forward_enter(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || g_set_context == nullptr) Py_RETURN_FALSE;
  PyObject* stack = fast_stack();
  bool done = false;
  if (stack != nullptr) {
    bool in_backward = torch::autograd::get_current_graph_task_id() != -1;
    Py_ssize_t n = PyList_GET_SIZE(stack);
    if (n == 0) {
      done = enter_root(stack, a[0], in_backward);
    } else {
      PyObject* top = PyList_GET_ITEM(stack, n - 1);
      done = is_frame(top) && enter_child(stack, top, a[0], a[1], in_backward);
    }
  }
  if (PyErr_Occurred()) PyErr_Clear();
  return PyBool_FromLong(done);
}

// forward_exit(module, result[, args, kwargs]) -> True (forward_post done
// here), False (nothing done), a context id (done but for claiming the nodes
// of the tensors nested in result, which the caller does for that context),
// or, for an outermost module, a list: done but for sending these input marks
// (address, "input", 0). Without args and kwargs an outermost module is
// declined.
PyObject* forward_exit(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if ((nargs != 2 && nargs != 4) || g_set_context == nullptr) Py_RETURN_FALSE;
  PyObject* module = a[0];
  PyObject* result = a[1];
  PyObject* stack = fast_stack();
  PyObject* out = nullptr;
  do {
    if (stack == nullptr || PyList_GET_SIZE(stack) == 0) break;
    Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
    PyObject* frame = PyList_GET_ITEM(stack, last);
    if (!is_frame(frame) || PyTuple_GET_ITEM(frame, 0) != module) break;  // frames of forwards that raised
    bool root = PyTuple_GET_ITEM(frame, 4) == Py_True;
    if (root && (nargs != 4 || !(result == Py_None || THPVariable_Check(result) || flat(result)) ||
                 !flat_inputs(a[2], a[3])))
      break;  // the Python path walks what is nested
    uint16_t prev, bwd;
    if (!context_arg(PyTuple_GET_ITEM(frame, 1), &prev) ||
        !context_arg(PyTuple_GET_ITEM(PyTuple_GET_ITEM(frame, 3), 1), &bwd))
      break;
    bool in_backward = torch::autograd::get_current_graph_task_id() != -1;
    PyObject* marks = nullptr;
    if (root && !in_backward) {
      marks = input_marks(a[2], a[3]);  // made first: a failure changes nothing
      if (marks == nullptr) break;
    }
    // list.pop() without its call: the list keeps its capacity.
    Py_SET_SIZE(stack, last);
    Py_DECREF(frame);
    g_set_context(prev);
    out = Py_True;
    if (result != Py_None && c10::GradMode::is_enabled() && !in_backward) {
      try {
        if (THPVariable_Check(result))
          claim_one(result, bwd);
        else if (flat(result))
          claim_items(result, bwd);
        else
          out = PyLong_FromLong(bwd);  // a new reference
      } catch (const std::exception&) {
      }
    }
    if (marks != nullptr)
      out = marks;  // the root's result is a tensor or flat: out was True
    else if (out == Py_True)
      Py_INCREF(out);
  } while (false);
  if (PyErr_Occurred()) PyErr_Clear();
  if (out == nullptr) Py_RETURN_FALSE;
  return out;
}

}  // namespace torchmem_hook
