// Marks in C (sources/_marks.py's): an optimizer step's end marks every
// parameter, gradient and buffer of the models that ran and every tensor in
// the optimizer's state, and sends what is new since the last step. In Python
// that is ~0.7 us a tensor, ~20 us a step on a 3-layer MLP and ~1.3 ms on a
// model of 386 parameters; here a dict walk and a pointer read a tensor. Part
// of the autograd context hook module (its method table lists these, its
// forward paths use referent and append_tensor); _marks.py keeps the Python
// versions, which give the same lists in the same order
// (tests/test_autograd_hooks.py compares).

#include "tensor_marks.h"
#include "key_set.h"

#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>

namespace torchmem_marks {

PyObject* referent(PyObject* ref) {
  if (!PyWeakref_CheckRef(ref)) return nullptr;
#if PY_VERSION_HEX >= 0x030D0000
  PyObject* target = nullptr;
  if (PyWeakref_GetRef(ref, &target) <= 0) return nullptr;
  Py_DECREF(target);  // the caller holds the owner, which holds the referent
  return target;
#else
  PyObject* target = PyWeakref_GET_OBJECT(ref);
  return target == Py_None ? nullptr : target;
#endif
}

// The start of a tensor's storage memory; 0 when it has none (a meta or sparse
// tensor, or a subclass without storage), as _marks.storage_marks skips them.
uintptr_t storage_address(const at::Tensor& t) {
  try {
    if (t.defined() && t.has_storage())
      return reinterpret_cast<uintptr_t>(t.storage().data());
  } catch (const std::exception&) {
  }
  return 0;
}

// Appends (address, category, ctx) unless the tensor has no storage memory;
// false on a Python error.
bool append_tensor(PyObject* out, const at::Tensor& t, PyObject* category, PyObject* ctx) {
  uintptr_t address = storage_address(t);
  if (address == 0) return true;
  PyObject* a = PyLong_FromUnsignedLongLong(address);
  if (a == nullptr) return false;
  PyObject* row = PyTuple_Pack(3, a, category, ctx);
  Py_DECREF(a);
  if (row == nullptr) return false;
  int rc = PyList_Append(out, row);
  Py_DECREF(row);
  return rc == 0;
}

namespace {

PyObject* g_parameter = nullptr;
PyObject* g_gradient = nullptr;
PyObject* g_buffer = nullptr;
PyObject* g_optimizer_state = nullptr;
PyObject* g_parameters_attr = nullptr;
PyObject* g_buffers_attr = nullptr;
PyObject* g_state_attr = nullptr;
PyObject* g_param_groups_attr = nullptr;
PyObject* g_params_key = nullptr;
PyObject* g_zero = nullptr;

constexpr unsigned long long kNotLive = ~0ULL;  // live_seqs' seq of an address not live

// Whether two values are equal: identity first, the usual case for the small
// ints and interned category names of marks.
int same_value(PyObject* a, PyObject* b) {
  if (a == b) return 1;
  return PyObject_RichCompareBool(a, b, Py_EQ);
}

bool append_object(PyObject* out, PyObject* obj, PyObject* category, PyObject* ctx) {
  if (!THPVariable_Check(obj)) return true;
  return append_tensor(out, THPVariable_Unpack(obj), category, ctx);
}

// The owner context by_id[key] gives parameter p, borrowed; nullptr when it has
// none (an entry of another object that had p's id, or no entry) or on a
// Python error (PyErr_Occurred tells).
PyObject* entry_ctx(PyObject* by_id, PyObject* key, PyObject* p) {
  PyObject* entry = PyDict_GetItemWithError(by_id, key);
  if (entry != nullptr && PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 2 &&
      referent(PyTuple_GET_ITEM(entry, 0)) == p)
    return PyTuple_GET_ITEM(entry, 1);
  return nullptr;
}

// Owners.owner_of: the owner context of parameter p in by_id, borrowed (0 when
// it has none); nullptr on a Python error.
PyObject* owner_of(PyObject* by_id, PyObject* p) {
  PyObject* key = PyLong_FromVoidPtr(p);
  if (key == nullptr) return nullptr;
  PyObject* ctx = entry_ctx(by_id, key, p);
  Py_DECREF(key);
  return ctx != nullptr ? ctx : PyErr_Occurred() ? nullptr : g_zero;
}

// Records in by_id that p is owned by ctx (when it does not say so already).
bool set_owner(PyObject* by_id, PyObject* p, PyObject* ctx) {
  PyObject* key = PyLong_FromVoidPtr(p);
  if (key == nullptr) return false;
  PyObject* held = entry_ctx(by_id, key, p);
  int same = held != nullptr ? same_value(held, ctx) : PyErr_Occurred() ? -1 : 0;
  int rc = same;
  if (same == 0) {
    PyObject* ref = PyWeakref_NewRef(p, nullptr);  // torchmem never keeps a model alive
    PyObject* value = ref == nullptr ? nullptr : PyTuple_Pack(2, ref, ctx);
    Py_XDECREF(ref);
    rc = value != nullptr && PyDict_SetItem(by_id, key, value) == 0 ? 1 : -1;
    Py_XDECREF(value);
  }
  Py_DECREF(key);
  return rc == 1;
}

// Owners.state_marks: the tensors in optimizer.state, owned by their
// parameter's module. False on a Python error; *handled false when the
// optimizer's state is not a dict of dicts (Python reads it then).
bool state_marks(PyObject* out, PyObject* optimizer, PyObject* by_id, bool* handled) {
  PyObject* state = PyObject_GetAttr(optimizer, g_state_attr);
  if (state == nullptr) return false;
  bool ok = true;
  if (!PyDict_Check(state)) {
    *handled = false;
  } else {
    Py_ssize_t pos = 0;
    PyObject* p;
    PyObject* values;
    while (ok && PyDict_Next(state, &pos, &p, &values)) {
      if (!PyDict_Check(values)) continue;
      PyObject* ctx = owner_of(by_id, p);
      if (ctx == nullptr) {
        ok = false;
        break;
      }
      Py_INCREF(ctx);
      Py_ssize_t vpos = 0;
      PyObject* k;
      PyObject* v;
      while (ok && PyDict_Next(values, &vpos, &k, &v))
        ok = append_object(out, v, g_optimizer_state, ctx);
      Py_DECREF(ctx);
    }
  }
  Py_DECREF(state);
  return ok;
}

// Owners.model_marks over `owned` ((module weakref, owner ctx) per module).
bool model_marks(PyObject* out, PyObject* owned, PyObject* by_id) {
  KeySet seen(64 + 4 * size_t(PyList_GET_SIZE(owned)));  // shared parameters: the first owns
  Py_ssize_t n = PyList_GET_SIZE(owned);
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* item = PyList_GET_ITEM(owned, i);
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) continue;
    PyObject* module = referent(PyTuple_GET_ITEM(item, 0));
    if (module == nullptr) continue;
    Py_INCREF(module);
    PyObject* ctx = PyTuple_GET_ITEM(item, 1);
    PyObject* params = PyObject_GetAttr(module, g_parameters_attr);
    PyObject* buffers = params == nullptr ? nullptr : PyObject_GetAttr(module, g_buffers_attr);
    bool ok = buffers != nullptr;
    if (ok && PyDict_Check(params)) {
      Py_ssize_t pos = 0;
      PyObject* k;
      PyObject* p;
      while (ok && PyDict_Next(params, &pos, &k, &p)) {
        if (p == Py_None || !seen.insert(reinterpret_cast<uintptr_t>(p))) continue;
        ok = set_owner(by_id, p, ctx);
        if (ok && THPVariable_Check(p)) {
          const at::Tensor& t = THPVariable_Unpack(p);
          ok = append_tensor(out, t, g_parameter, ctx);
          if (ok) {
            const at::Tensor& g = t.grad();
            if (g.defined()) ok = append_tensor(out, g, g_gradient, ctx);
          }
        }
      }
    }
    if (ok && PyDict_Check(buffers)) {
      Py_ssize_t pos = 0;
      PyObject* k;
      PyObject* b;
      while (ok && PyDict_Next(buffers, &pos, &k, &b))
        if (b != Py_None) ok = append_object(out, b, g_buffer, ctx);
    }
    Py_XDECREF(buffers);
    Py_XDECREF(params);
    Py_DECREF(module);
    if (!ok) return false;
  }
  return true;
}

// Owners.unowned_grads: .grad of the optimizer's parameters no model that ran
// owns. *handled false when param_groups is not a list of dicts of lists.
bool unowned_grads(PyObject* out, PyObject* optimizer, PyObject* by_id, bool* handled) {
  PyObject* groups = PyObject_GetAttr(optimizer, g_param_groups_attr);
  if (groups == nullptr) return false;
  bool ok = true;
  if (!PyList_Check(groups)) *handled = false;
  for (Py_ssize_t i = 0; ok && *handled && i < PyList_GET_SIZE(groups); ++i) {
    PyObject* group = PyList_GET_ITEM(groups, i);
    PyObject* params = PyDict_Check(group) ? PyDict_GetItemWithError(group, g_params_key)
                                           : nullptr;
    if (params == nullptr || !PyList_Check(params)) {
      if (PyErr_Occurred()) ok = false;
      *handled = false;
      break;
    }
    for (Py_ssize_t j = 0; ok && j < PyList_GET_SIZE(params); ++j) {
      PyObject* p = PyList_GET_ITEM(params, j);
      if (!THPVariable_Check(p)) continue;
      const at::Tensor& g = THPVariable_Unpack(p).grad();
      if (!g.defined()) continue;
      PyObject* ctx = owner_of(by_id, p);
      if (ctx == nullptr) {
        ok = false;
      } else if (ctx == g_zero || PyObject_Not(ctx) == 1) {
        ok = append_tensor(out, g, g_gradient, g_zero);
      }
    }
  }
  Py_DECREF(groups);
  return ok;
}

bool intern(PyObject** slot, const char* text) {
  *slot = PyUnicode_InternFromString(text);
  return *slot != nullptr;
}

}  // namespace

bool init() {
  g_zero = PyLong_FromLong(0);
  return g_zero != nullptr && intern(&g_parameter, "parameter") &&
         intern(&g_gradient, "gradient") && intern(&g_buffer, "buffer") &&
         intern(&g_optimizer_state, "optimizer_state") &&
         intern(&g_parameters_attr, "_parameters") && intern(&g_buffers_attr, "_buffers") &&
         intern(&g_state_attr, "state") && intern(&g_param_groups_attr, "param_groups") &&
         intern(&g_params_key, "params");
}

// storage_marks(marks) -> list: each (tensor, category, ctx) of the list
// `marks` as (its storage's start address, category, ctx), those without
// storage memory left out (sources/_marks.py's storage_marks, at ~40 ns a
// tensor instead of ~200).
PyObject* storage_marks(PyObject*, PyObject* marks) {
  if (!PyList_Check(marks)) {
    PyErr_SetString(PyExc_TypeError, "storage_marks(list of (tensor, category, ctx))");
    return nullptr;
  }
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(marks); ++i) {
    PyObject* m = PyList_GET_ITEM(marks, i);
    if (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) != 3) continue;
    if (!append_object(out, PyTuple_GET_ITEM(m, 0), PyTuple_GET_ITEM(m, 1),
                       PyTuple_GET_ITEM(m, 2))) {
      Py_DECREF(out);
      return nullptr;
    }
  }
  return out;
}

// owned_marks(optimizer or None, owned, by_id) -> list or None: the storage
// marks (address, category, ctx) of Owners.state_marks(optimizer), then
// model_marks(owned), then unowned_grads(optimizer), as _marks.py orders
// them; None when the optimizer's state or groups are not plain dicts and
// lists (Python reads them). by_id is Owners._by_id, updated here.
PyObject* owned_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !PyList_Check(args[1]) || !PyDict_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "owned_marks(optimizer or None, list, dict)");
    return nullptr;
  }
  PyObject* optimizer = args[0];
  PyObject* by_id = args[2];
  PyObject* out = PyList_New(0);
  if (out == nullptr) return nullptr;
  bool handled = true;
  bool ok = true;
  try {
    if (optimizer != Py_None) ok = state_marks(out, optimizer, by_id, &handled);
    if (ok && handled) ok = model_marks(out, args[1], by_id);
    if (ok && handled && optimizer != Py_None)
      ok = unowned_grads(out, optimizer, by_id, &handled);
  } catch (const std::exception& e) {
    if (!PyErr_Occurred()) PyErr_SetString(PyExc_RuntimeError, e.what());
    ok = false;
  }
  if (!ok) {
    Py_DECREF(out);
    return nullptr;
  }
  if (!handled) {
    Py_DECREF(out);
    Py_RETURN_NONE;
  }
  return out;
}

// fresh_marks(marks, found, sent, withdraw or None) -> (new, stale): MarkSender's
// comparison. marks: (address, category, ctx) tuples; found: live_seqs' (seq,
// ctx) for each. An address not live or seen before in marks is skipped;
// the others whose (seq, category, ctx) differs from sent[address] are
// recorded in sent and listed in new. stale: the addresses in sent with
// category `withdraw` that are not in marks.
PyObject* fresh_marks(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1]) ||
      !PyDict_Check(args[2]) || PyList_GET_SIZE(args[0]) != PyList_GET_SIZE(args[1])) {
    PyErr_SetString(PyExc_TypeError,
                    "fresh_marks(list of marks, list of (seq, ctx) as long, dict, str or None)");
    return nullptr;
  }
  PyObject* marks = args[0];
  PyObject* found = args[1];
  PyObject* sent = args[2];
  PyObject* withdraw = args[3];
  PyObject* fresh = PyList_New(0);
  if (fresh == nullptr) return nullptr;
  KeySet seen(size_t(PyList_GET_SIZE(marks)));
  bool ok = true;
  for (Py_ssize_t i = 0; ok && i < PyList_GET_SIZE(marks); ++i) {
    PyObject* m = PyList_GET_ITEM(marks, i);
    PyObject* f = PyList_GET_ITEM(found, i);
    if (!PyTuple_Check(m) || PyTuple_GET_SIZE(m) != 3 || !PyTuple_Check(f) ||
        PyTuple_GET_SIZE(f) < 1) {
      PyErr_SetString(PyExc_TypeError, "fresh_marks: a mark or a live_seqs row is not a tuple");
      ok = false;
      break;
    }
    PyObject* address = PyTuple_GET_ITEM(m, 0);
    PyObject* seq = PyTuple_GET_ITEM(f, 0);
    unsigned long long a = PyLong_AsUnsignedLongLong(address);
    unsigned long long s = PyLong_AsUnsignedLongLong(seq);
    if (PyErr_Occurred()) {
      ok = false;
      break;
    }
    if (s == kNotLive || !seen.insert(a)) continue;
    PyObject* category = PyTuple_GET_ITEM(m, 1);
    PyObject* ctx = PyTuple_GET_ITEM(m, 2);
    PyObject* last = PyDict_GetItemWithError(sent, address);
    if (last == nullptr && PyErr_Occurred()) {
      ok = false;
      break;
    }
    if (last != nullptr && PyTuple_CheckExact(last) && PyTuple_GET_SIZE(last) == 3) {
      int same = same_value(PyTuple_GET_ITEM(last, 0), seq);
      if (same == 1) same = same_value(PyTuple_GET_ITEM(last, 1), category);
      if (same == 1) same = same_value(PyTuple_GET_ITEM(last, 2), ctx);
      if (same < 0) {
        ok = false;
        break;
      }
      if (same == 1) continue;
    }
    PyObject* state = PyTuple_Pack(3, seq, category, ctx);
    ok = state != nullptr && PyDict_SetItem(sent, address, state) == 0 &&
         PyList_Append(fresh, m) == 0;
    Py_XDECREF(state);
  }
  PyObject* stale = ok ? PyList_New(0) : nullptr;
  if (stale != nullptr && withdraw != Py_None) {
    Py_ssize_t pos = 0;
    PyObject* address;
    PyObject* state;
    while (PyDict_Next(sent, &pos, &address, &state)) {
      if (!PyTuple_CheckExact(state) || PyTuple_GET_SIZE(state) != 3) continue;
      int is = same_value(PyTuple_GET_ITEM(state, 1), withdraw);
      if (is < 0) break;
      if (is == 0) continue;
      unsigned long long a = PyLong_AsUnsignedLongLong(address);
      if (PyErr_Occurred()) break;
      if (!seen.contains(a) && PyList_Append(stale, address) != 0) break;
    }
    if (PyErr_Occurred()) Py_CLEAR(stale);
  }
  if (stale == nullptr) {
    Py_DECREF(fresh);
    return nullptr;
  }
  PyObject* result = PyTuple_Pack(2, fresh, stale);
  Py_DECREF(fresh);
  Py_DECREF(stale);
  return result;
}

}  // namespace torchmem_marks
