// The holder search's heap walk (src/torchmem/analysis/holders.py): the
// per-edge work of a breadth-first walk over the GC's objects. Python keeps
// the levels (lists that hold every walked object alive while it runs), the
// edges the GC does not show and all the naming; this file only answers
// "which referents of these objects were not walked yet" and "which object of
// this level refers to that one", calling tp_traverse as gc.get_referents
// does, with a set of object addresses instead of Python ints. Done in
// Python with C-level builtins (get_referents, id maps, set filters) the walk
// cost ~5 us per object on the 2-core machine benchmarks/holders.py ran on;
// here it is about one tp_traverse per object.
//
// Everything runs with the GIL held and calls no Python code: traverse
// functions only report references, and the only allocation is PyList_Append.
#include <nanobind/nanobind.h>

#include <cstdint>
#include <unordered_map>
#include <vector>

namespace nb = nanobind;

namespace {

// Addresses of objects, open addressing with linear probing; never erased
// one by one (the walk only adds), cleared whole.
class PtrSet {
 public:
  bool insert(PyObject* p) {
    if ((count_ + 1) * 2 > slots_.size()) grow();
    size_t i = slot(p);
    while (slots_[i] != nullptr) {
      if (slots_[i] == p) return false;
      i = (i + 1) & (slots_.size() - 1);
    }
    slots_[i] = p;
    ++count_;
    return true;
  }

  bool contains(PyObject* p) const {
    if (slots_.empty()) return false;
    size_t i = slot(p);
    while (slots_[i] != nullptr) {
      if (slots_[i] == p) return true;
      i = (i + 1) & (slots_.size() - 1);
    }
    return false;
  }

  size_t size() const { return count_; }

  void clear() {
    std::vector<PyObject*>().swap(slots_);
    count_ = 0;
    shift_ = 64;
  }

 private:
  size_t slot(PyObject* p) const {
    // Fibonacci hashing of the address without its alignment bits.
    uint64_t x = static_cast<uint64_t>(reinterpret_cast<uintptr_t>(p)) >> 4;
    return static_cast<size_t>((x * 0x9E3779B97F4A7C15ull) >> shift_);
  }

  void grow() {
    std::vector<PyObject*> old;
    old.swap(slots_);
    size_t n = old.empty() ? 4096 : old.size() * 2;
    slots_.assign(n, nullptr);
    shift_ = 64;
    for (size_t s = n; s > 1; s >>= 1) --shift_;
    count_ = 0;
    for (PyObject* p : old) {
      if (p != nullptr) insert(p);
    }
  }

  std::vector<PyObject*> slots_;
  size_t count_ = 0;
  unsigned shift_ = 64;
};

struct HeapWalk {
  PtrSet seen;
};

struct ExpandState {
  PtrSet* seen;
  PyObject* out;
};

int visit_new(PyObject* child, void* arg) {
  auto* st = static_cast<ExpandState*>(arg);
  // An object the GC does not track refers to nothing it could show: a leaf
  // (str, int, ...), never a tensor.
  if (!PyObject_IS_GC(child)) return 0;
  if (st->seen->insert(child) && PyList_Append(st->out, child) < 0) return -1;
  return 0;
}

bool traversable(PyObject* obj) {
  return PyObject_IS_GC(obj) && Py_TYPE(obj)->tp_traverse != nullptr;
}

struct FindState {
  std::unordered_map<PyObject*, size_t>* index;
  std::vector<PyObject*>* found;
  size_t* remaining;
  PyObject* current;
};

int visit_find(PyObject* child, void* arg) {
  auto* st = static_cast<FindState*>(arg);
  auto it = st->index->find(child);
  if (it == st->index->end() || (*st->found)[it->second] != nullptr) return 0;
  (*st->found)[it->second] = st->current;
  return --*st->remaining == 0 ? 1 : 0;  // non-zero stops the traversal
}

nb::list expand(HeapWalk& w, nb::list level, size_t start, size_t stop) {
  PyObject* lst = level.ptr();
  nb::list out;
  ExpandState st{&w.seen, out.ptr()};
  size_t n = static_cast<size_t>(PyList_GET_SIZE(lst));
  for (size_t i = start; i < stop && i < n; ++i) {
    PyObject* obj = PyList_GET_ITEM(lst, i);
    if (!traversable(obj)) continue;
    if (Py_TYPE(obj)->tp_traverse(obj, visit_new, &st) < 0) throw nb::python_error();
  }
  return out;
}

nb::list first_referrers(nb::list level, nb::list wanted) {
  std::unordered_map<PyObject*, size_t> index;
  size_t n_wanted = static_cast<size_t>(PyList_GET_SIZE(wanted.ptr()));
  for (size_t i = 0; i < n_wanted; ++i) index.emplace(PyList_GET_ITEM(wanted.ptr(), i), i);
  std::vector<PyObject*> found(n_wanted, nullptr);
  size_t remaining = index.size();
  FindState st{&index, &found, &remaining, nullptr};
  PyObject* lst = level.ptr();
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lst) && remaining > 0; ++i) {
    PyObject* obj = PyList_GET_ITEM(lst, i);
    if (!traversable(obj)) continue;
    st.current = obj;
    Py_TYPE(obj)->tp_traverse(obj, visit_find, &st);
  }
  nb::list out;
  for (size_t i = 0; i < n_wanted; ++i) {
    // A wanted object listed twice has its referrer in the first slot only.
    PyObject* r = found[index[PyList_GET_ITEM(wanted.ptr(), i)]];
    out.append(r != nullptr ? nb::handle(r) : nb::none());
  }
  return out;
}

nb::list unseen(HeapWalk& w, nb::list objs) {
  nb::list out;
  PyObject* lst = objs.ptr();
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lst); ++i) {
    PyObject* obj = PyList_GET_ITEM(lst, i);
    if (!w.seen.contains(obj)) out.append(nb::handle(obj));
  }
  return out;
}

}  // namespace

void bind_heap_walk(nb::module_& m) {
  nb::class_<HeapWalk>(m, "HeapWalk",
                       "The set of objects a holder search has walked (addresses, no references).")
      .def(nb::init<>())
      .def("add", [](HeapWalk& w, nb::handle obj) { return w.seen.insert(obj.ptr()); },
           nb::arg("obj").none(), "Marks ``obj`` walked; True if it was not yet.")
      .def("__contains__", [](HeapWalk& w, nb::handle obj) { return w.seen.contains(obj.ptr()); },
           nb::arg("obj").none())
      .def("__len__", [](HeapWalk& w) { return w.seen.size(); })
      .def("clear", [](HeapWalk& w) { w.seen.clear(); })
      .def("expand", &expand, nb::arg("level"), nb::arg("start"), nb::arg("stop"),
           "The GC-tracked referents of level[start:stop] not walked yet, in the order met; "
           "marks them walked.")
      .def("unseen", &unseen, nb::arg("objs"), "The objects of ``objs`` not walked.")
      .def_static("first_referrers", &first_referrers, nb::arg("level"), nb::arg("wanted"),
                  "For each object of ``wanted``, the first object of ``level`` that refers "
                  "to it (None where none does).");
}
