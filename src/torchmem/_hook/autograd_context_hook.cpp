// Backward attribution without Python in the backward pass: a C++ pre-hook on
// the autograd node that made a module's output sets that module's backward
// context when the node is about to run (torchmem/sources/context.py).
//
// Python's grad_fn.register_prehook costs about 2.7 us a node (a
// RemovableHandle, a dict entry) and its hook another 1.3 us when the node
// runs (the GIL taken on the engine's thread, a Python call): several us per
// module call in every training step. Here claiming a node is one C call from
// the forward hook, and the hook is two stores and a thread-local compare.
// Python runs once per backward pass per thread, on its first claimed node
// (the backward-start mark); the context before it comes back at the pass's
// end through an engine callback queued here.
//
// Built against the installed torch at first use (torchmem.sources._build):
// Node's layout and FunctionPreHook's vtable belong to one torch build. It is
// a CPython extension module so its functions are called the cheap way.

#include <Python.h>

#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/function.h>  // Node (node.h since torch 2.12)
#include <torch/csrc/autograd/python_variable.h>
#include <c10/core/GradMode.h>

#include "tensor_marks.h"

#include <cstdint>
#include <memory>
#include <thread>

namespace {

using SetContextFn = void (*)(uint16_t);
using GetContextFn = uint16_t (*)();

SetContextFn g_set_context = nullptr;
GetContextFn g_get_context = nullptr;
PyObject* g_on_backward_start = nullptr;  // callable(graph task id, context id)
PyObject* g_thread_key = nullptr;  // fast_stack's entry in the per-thread dict
PyObject* g_name_names = nullptr;
thread_local int t_task = -1;             // the graph task whose start was reported

// The context the thread had when the backward pass reached its first claimed
// node comes back when the pass ends (an engine callback, on the thread that
// ends it: only there, if it is this one).
void restore_at_end() {
  uint16_t before = g_get_context();
  std::thread::id self = std::this_thread::get_id();
  try {
    torch::autograd::Engine::get_default_engine().queue_callback([before, self] {
      if (std::this_thread::get_id() == self) g_set_context(before);
    });
  } catch (const std::exception&) {
    // not inside a backward pass after all: nothing to restore at its end
  }
}

void report_backward_start(int task, uint16_t ctx) {
  if (g_on_backward_start == nullptr) return;
  PyGILState_STATE gil = PyGILState_Ensure();
  PyObject* r = PyObject_CallFunction(g_on_backward_start, "iI", task, unsigned(ctx));
  if (r == nullptr) PyErr_Clear();  // never into the training run
  Py_XDECREF(r);
  PyGILState_Release(gil);
}

struct ContextPreHook final : torch::autograd::FunctionPreHook {
  explicit ContextPreHook(uint16_t ctx) : ctx(ctx) {}

  torch::autograd::variable_list operator()(
      const torch::autograd::variable_list& grads) override {
    int task = torch::autograd::get_current_graph_task_id();
    if (task != t_task) {
      t_task = task;
      restore_at_end();
      report_backward_start(task, ctx);
    }
    g_set_context(ctx);
    return grads;  // gradients untouched
  }

  // Compiled autograd asks every pre-hook to register itself; this one stays
  // out of the compiled graph (its backward then runs without module
  // context) rather than fail the user's backward. No `override`: the
  // method became const in later torch, and where it is not, this is only
  // an overload (the old default then throws, as for any C++ hook).
  void compiled_args(torch::dynamo::autograd::CompiledNodeArgs&) const {}

  const uint16_t ctx;
};

bool claimed(const torch::autograd::Node& node) {
  for (const auto& h : node.pre_hooks())
    if (dynamic_cast<const ContextPreHook*>(h.get()) != nullptr) return true;
  return false;
}

// Claims the node of one tensor for ctx; false when there is nothing to claim.
bool claim_one(PyObject* obj, uint16_t ctx) {
  if (!THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined()) return false;
  const auto& fn = t.grad_fn();  // a shared_ptr or an intrusive_ptr, by torch version
  if (!fn || claimed(*fn)) return false;
  fn->add_pre_hook(std::make_unique<ContextPreHook>(ctx));
  return true;
}

// The nodes of the tensors directly in a tuple or list; how many it claimed.
long claim_items(PyObject* v, uint16_t ctx) {
  Py_ssize_t len = PySequence_Fast_GET_SIZE(v);
  PyObject** items = PySequence_Fast_ITEMS(v);
  long n = 0;
  for (Py_ssize_t i = 0; i < len; ++i) n += claim_one(items[i], ctx);
  return n;
}

// claim(value, ctx) -> int: a tensor, or the tensors directly in a tuple or
// list: each one's grad_fn not claimed yet gets ctx's hook. Returns how many
// nodes it claimed. Anything else in value is left alone (Python walks it).
PyObject* claim(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2) {
    PyErr_SetString(PyExc_TypeError, "claim(value, context_id)");
    return nullptr;
  }
  if (g_set_context == nullptr) {
    PyErr_SetString(PyExc_RuntimeError, "claim before install");
    return nullptr;
  }
  unsigned long ctx = PyLong_AsUnsignedLong(args[1]);
  if (ctx == static_cast<unsigned long>(-1) && PyErr_Occurred()) return nullptr;
  if (ctx > 0xFFFF) {
    PyErr_SetString(PyExc_ValueError, "context_id must fit in 16 bits");
    return nullptr;
  }
  long n = 0;
  try {
    PyObject* v = args[0];
    n = PyTuple_Check(v) || PyList_Check(v) ? claim_items(v, uint16_t(ctx))
                                            : claim_one(v, uint16_t(ctx));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
  return PyLong_FromLong(n);
}

// -- the forward hooks' common case (context.py's _Hooks.forward_pre/post) ----
// A module called inside a running module whose anchor already names it, on a
// thread that claims nodes with this module: the same stack entry, context
// and claims as the Python hooks, without their bytecode (about 6,800
// instructions a module call, callgrind). Anything else (an outermost module, a module not named yet, a frame
// that is not on top) returns False having changed nothing, and the Python
// hooks do it. These functions never raise: an unexpected object is a
// False.

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

// A stack frame: (module, context before, anchor, (fwd, bwd, path), is outermost).
bool is_frame(PyObject* f) {
  return PyTuple_CheckExact(f) && PyTuple_GET_SIZE(f) == 5 &&
         PyTuple_CheckExact(PyTuple_GET_ITEM(f, 3)) && PyTuple_GET_SIZE(PyTuple_GET_ITEM(f, 3)) == 3;
}

// forward_enter(module, args) -> bool: forward_pre done here.
PyObject* forward_enter(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || g_set_context == nullptr) Py_RETURN_FALSE;
  PyObject* module = a[0];
  PyObject* args = a[1];
  bool done = false;
  PyObject* stack = fast_stack();
  PyObject* names = nullptr;
  PyObject* key = nullptr;
  PyObject* frame = nullptr;
  do {
    if (stack == nullptr || PyList_GET_SIZE(stack) == 0) break;
    PyObject* top = PyList_GET_ITEM(stack, PyList_GET_SIZE(stack) - 1);
    if (!is_frame(top)) break;
    PyObject* anchor = PyTuple_GET_ITEM(top, 2);
    if (anchor == Py_None) break;  // an optimizer step's frame
    names = PyObject_GetAttr(anchor, g_name_names);
    if (names == nullptr || !PyDict_CheckExact(names)) break;
    key = PyLong_FromVoidPtr(module);
    if (key == nullptr) break;
    PyObject* entry = PyDict_GetItemWithError(names, key);  // (weakref, ctx, path)
    if (entry == nullptr || !PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 3) break;
    PyObject* ctx = PyTuple_GET_ITEM(entry, 1);
    if (!PyTuple_CheckExact(ctx) || PyTuple_GET_SIZE(ctx) != 3) break;  // not interned yet
    if (!refers_to(PyTuple_GET_ITEM(entry, 0), module)) break;
    uint16_t fwd, bwd, caller_bwd;
    if (!context_arg(PyTuple_GET_ITEM(ctx, 0), &fwd) ||
        !context_arg(PyTuple_GET_ITEM(ctx, 1), &bwd) ||
        !context_arg(PyTuple_GET_ITEM(PyTuple_GET_ITEM(top, 3), 1), &caller_bwd))
      break;
    PyObject* prev = PyLong_FromLong(g_get_context());
    if (prev == nullptr) break;
    frame = PyTuple_Pack(5, module, prev, anchor, ctx, Py_False);
    Py_DECREF(prev);
    if (frame == nullptr || PyList_Append(stack, frame) != 0) break;
    bool in_backward = torch::autograd::get_current_graph_task_id() != -1;
    g_set_context(in_backward ? bwd : fwd);
    done = true;
    // Inputs made by the caller's own ops: the caller's context holds again
    // once this module's backward is done.
    if (!in_backward && c10::GradMode::is_enabled() && PyTuple_Check(args) &&
        PyTuple_GET_SIZE(args) > 0) {
      try {
        claim_items(args, caller_bwd);
      } catch (const std::exception&) {
        // as the Python hook: never into the training run
      }
    }
  } while (false);
  if (PyErr_Occurred()) PyErr_Clear();
  Py_XDECREF(frame);
  Py_XDECREF(key);
  Py_XDECREF(names);
  return PyBool_FromLong(done);
}

// Whether the Python hook's tensors_in(value) is value's own items: a tuple or
// list holding no tuple, list or dict.
bool flat(PyObject* v) {
  if (!PyTuple_Check(v) && !PyList_Check(v)) return false;
  Py_ssize_t len = PySequence_Fast_GET_SIZE(v);
  PyObject** items = PySequence_Fast_ITEMS(v);
  for (Py_ssize_t i = 0; i < len; ++i)
    if (PyTuple_Check(items[i]) || PyList_Check(items[i]) || PyDict_Check(items[i])) return false;
  return true;
}

// forward_exit(module, result) -> True (forward_post done here), False
// (nothing done), or a context id: done but for claiming the nodes of the
// tensors nested in result, which the caller does for that context.
PyObject* forward_exit(PyObject*, PyObject* const* a, Py_ssize_t nargs) {
  if (nargs != 2 || g_set_context == nullptr) Py_RETURN_FALSE;
  PyObject* module = a[0];
  PyObject* result = a[1];
  PyObject* stack = fast_stack();
  PyObject* out = nullptr;
  do {
    if (stack == nullptr || PyList_GET_SIZE(stack) == 0) break;
    Py_ssize_t last = PyList_GET_SIZE(stack) - 1;
    PyObject* frame = PyList_GET_ITEM(stack, last);
    if (!is_frame(frame) || PyTuple_GET_ITEM(frame, 0) != module ||
        PyTuple_GET_ITEM(frame, 4) != Py_False)
      break;  // an outermost module, or frames of forwards that raised
    uint16_t prev, bwd;
    if (!context_arg(PyTuple_GET_ITEM(frame, 1), &prev) ||
        !context_arg(PyTuple_GET_ITEM(PyTuple_GET_ITEM(frame, 3), 1), &bwd))
      break;
    // list.pop() without its call: the list keeps its capacity.
    Py_SET_SIZE(stack, last);
    Py_DECREF(frame);
    g_set_context(prev);
    out = Py_True;
    if (result != Py_None && c10::GradMode::is_enabled() &&
        torch::autograd::get_current_graph_task_id() == -1) {
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
    if (out == Py_True) Py_INCREF(out);
  } while (false);
  if (PyErr_Occurred()) PyErr_Clear();
  if (out == nullptr) Py_RETURN_FALSE;
  return out;
}

// install(set_context_address, get_context_address, on_backward_start): what
// the hooks call. Claiming before install is refused (the hooks would have no
// context functions).
PyObject* install(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyCallable_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError,
                    "install(set_context_address, get_context_address, on_backward_start)");
    return nullptr;
  }
  void* set = PyLong_AsVoidPtr(args[0]);
  void* get = set == nullptr ? nullptr : PyLong_AsVoidPtr(args[1]);
  if (set == nullptr || get == nullptr) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null context function address");
    return nullptr;
  }
  g_set_context = reinterpret_cast<SetContextFn>(set);
  g_get_context = reinterpret_cast<GetContextFn>(get);
  Py_INCREF(args[2]);
  Py_XSETREF(g_on_backward_start, args[2]);
  Py_RETURN_NONE;
}

// is_claimed(tensor) -> bool: its grad_fn carries a context hook (tests).
PyObject* is_claimed(PyObject*, PyObject* obj) {
  if (!THPVariable_Check(obj)) Py_RETURN_FALSE;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (t.defined()) {
    const auto& fn = t.grad_fn();
    if (fn && claimed(*fn)) Py_RETURN_TRUE;
  }
  Py_RETURN_FALSE;
}

PyMethodDef kMethods[] = {
    {"claim", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(claim)),
     METH_FASTCALL, "claim(value, context_id) -> nodes claimed"},
    {"install", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(install)),
     METH_FASTCALL, "install(set_context_address, get_context_address, on_backward_start)"},
    {"is_claimed", is_claimed, METH_O, "is_claimed(tensor) -> bool"},
    {"forward_enter", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_enter)),
     METH_FASTCALL, "forward_enter(module, args) -> bool: the forward pre-hook done"},
    {"forward_exit", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(forward_exit)),
     METH_FASTCALL,
     "forward_exit(module, result) -> True, False or the context to claim result for"},
    {"bind_thread", bind_thread, METH_O,
     "bind_thread(stack or None): this thread's running modules, for the fast paths"},
    {"storage_marks", torchmem_marks::storage_marks, METH_O,
     "storage_marks(list of (tensor, category, ctx)) -> list of (address, category, ctx)"},
    {"owned_marks",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(torchmem_marks::owned_marks)),
     METH_FASTCALL, "owned_marks(optimizer or None, owned, by_id) -> list of marks or None"},
    {"fresh_marks",
     reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(torchmem_marks::fresh_marks)),
     METH_FASTCALL, "fresh_marks(marks, found, sent, withdraw) -> (new, stale)"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "torchmem_autograd_context_hook",
                       "Autograd node pre-hooks setting torchmem's backward context.", -1,
                       kMethods};

}  // namespace

PyMODINIT_FUNC PyInit_torchmem_autograd_context_hook() {
  PyObject* m = PyModule_Create(&kModule);
  if (m == nullptr) return nullptr;
  g_thread_key = PyUnicode_InternFromString("torchmem.context.stack");
  g_name_names = PyUnicode_InternFromString("names");
  if (!g_thread_key || !g_name_names || !torchmem_marks::init()) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
