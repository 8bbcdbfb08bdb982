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

#include "context_hook.h"
#include "tensor_marks.h"

#include <cstdint>
#include <memory>
#include <thread>

namespace torchmem_hook {
SetContextFn g_set_context = nullptr;
GetContextFn g_get_context = nullptr;
}  // namespace torchmem_hook

namespace {

using namespace torchmem_hook;

PyObject* g_on_backward_start = nullptr;  // callable(graph task id, context id)
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

}  // namespace

namespace torchmem_hook {

bool claim_one(PyObject* obj, uint16_t ctx) {
  if (!THPVariable_Check(obj)) return false;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined()) return false;
  const auto& fn = t.grad_fn();  // a shared_ptr or an intrusive_ptr, by torch version
  if (!fn || claimed(*fn)) return false;
  fn->add_pre_hook(std::make_unique<ContextPreHook>(ctx));
  return true;
}

long claim_items(PyObject* v, uint16_t ctx) {
  Py_ssize_t len = PySequence_Fast_GET_SIZE(v);
  PyObject** items = PySequence_Fast_ITEMS(v);
  long n = 0;
  for (Py_ssize_t i = 0; i < len; ++i) n += claim_one(items[i], ctx);
  return n;
}

}  // namespace torchmem_hook

namespace {

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
     "forward_exit(module, result[, args, kwargs]) -> True, False, the context to claim "
     "result for, or an outermost module's input marks"},
    {"bind_thread", bind_thread, METH_O,
     "bind_thread(stack or None): this thread's running modules, for the fast paths"},
    {"use_roots", use_roots, METH_O,
     "use_roots(dict or None): the outermost modules' entries, for the fast paths"},
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
  if (!torchmem_hook::forward_init() || !torchmem_marks::init()) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
