#include "stack_capture.hpp"

#include "frame_walk.hpp"

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <frameobject.h>

#include <atomic>
#include <memory>
#include <mutex>

#if PY_VERSION_HEX < 0x030B0000
// Python 3.10 has neither PyFrame_GetLasti nor co_qualname.
static int PyFrame_GetLasti(PyFrameObject* f) { return f->f_lasti; }
#endif

namespace torchmem {

namespace {
std::atomic<bool> g_capture{false};
std::atomic<int> g_depth{10};
std::mutex g_prefix_mu;
std::vector<std::string> g_skip_prefixes;

bool skipped(const std::string& filename) {
  std::lock_guard<std::mutex> lock(g_prefix_mu);
  for (const std::string& p : g_skip_prefixes)
    if (filename.compare(0, p.size(), p) == 0) return true;
  return false;
}

std::string utf8(PyObject* s) {
  if (!s || !PyUnicode_Check(s)) return "?";
  Py_ssize_t n = 0;
  const char* c = PyUnicode_AsUTF8AndSize(s, &n);
  if (!c) {
    PyErr_Clear();
    return "?";
  }
  return std::string(c, static_cast<size_t>(n));
}
}  // namespace

StackTable& stack_table() {
  static StackTable* table = new StackTable();  // never destroyed: used at exit
  return *table;
}

bool stack_capture_enabled() { return g_capture.load(std::memory_order_relaxed); }
int stack_capture_depth() { return g_depth.load(std::memory_order_relaxed); }
void set_stack_capture(bool enabled, int depth) {
  g_capture.store(enabled, std::memory_order_relaxed);
  g_depth.store(depth, std::memory_order_relaxed);
}

void set_skip_prefixes(std::vector<std::string> prefixes) {
  std::lock_guard<std::mutex> lock(g_prefix_mu);
  g_skip_prefixes = std::move(prefixes);
}

namespace {
constexpr int kMaxDepth = 128;

// What one thread remembers between captures, so that a capture costs a
// walk of the frames and little else (issue 12: 307 -> ~100 ns at a real
// depth of 10):
// - frame ids of (code object, instruction offset) keys, direct-mapped:
//   the table's own lookup takes its mutex and hashes into an
//   unordered_map for every frame of every capture;
// - the last stack interned, outermost first, with the node of each level:
//   a training step allocates again and again under the same outer frames,
//   so the new stack shares a prefix with the last one and only the levels
//   below it are looked up in the prefix tree (none, and no lock, when the
//   whole stack repeats).
// Both stay valid for the life of the process: the table is process-wide,
// never cleared, and keeps every interned code object alive (an address
// always means the same code object). On the heap, made at a thread's first
// capture: 25 KB of thread_local data does not fit the static TLS block a
// dlopen'ed extension gets.
struct FrameCacheEntry {
  uintptr_t code;  // 0 = empty
  int lasti;
  uint32_t id;
  bool skip;
};
constexpr size_t kFrameCacheSize = 1024;  // power of two
struct CaptureCache {
  FrameCacheEntry frames[kFrameCacheSize];
  uint32_t path_frames[kMaxDepth];  // the last stack, outermost first
  uint32_t path_nodes[kMaxDepth];   // its node at each level
  int path_n;
};
thread_local std::unique_ptr<CaptureCache> t_cache;

CaptureCache& cache() {
  if (!t_cache) t_cache.reset(new CaptureCache());  // value-initialised: all empty
  return *t_cache;
}

inline size_t frame_slot(uintptr_t code, int lasti) {
  uint64_t h = (static_cast<uint64_t>(code) >> 4) * 0x9E3779B97F4A7C15ULL ^
               static_cast<uint64_t>(static_cast<uint32_t>(lasti)) * 0xC2B2AE3D27D4EB4FULL;
  return static_cast<size_t>(h >> 32) & (kFrameCacheSize - 1);
}

// `frame`: its frame object, or nullptr where the interpreter's frames are read
// (the line then comes from the code object and the offset, as
// PyFrame_GetLineNumber computes it when no tracer set one).
uint32_t frame_id_of(CaptureCache& c, StackTable& table, PyCodeObject* code, int lasti,
                     PyFrameObject* frame, bool* skip) {
  uintptr_t key = reinterpret_cast<uintptr_t>(code);
  FrameCacheEntry& e = c.frames[frame_slot(key, lasti)];
  if (e.code == key && e.lasti == lasti) {
    *skip = e.skip;
    return e.id;
  }
  uint32_t id = table.frame_id(
      key, lasti, skip, [&](FrameInfo* info, bool* is_skipped) {
        PyObject* filename = PyObject_GetAttrString(reinterpret_cast<PyObject*>(code),
                                                    "co_filename");
        PyObject* name = PyObject_GetAttrString(reinterpret_cast<PyObject*>(code),
                                                "co_qualname");
        if (!name) {
          PyErr_Clear();
          name = PyObject_GetAttrString(reinterpret_cast<PyObject*>(code), "co_name");
        }
        if (!filename || !name) PyErr_Clear();
        info->filename = utf8(filename);
        info->function = utf8(name);
        info->lineno = frame != nullptr ? PyFrame_GetLineNumber(frame)
                                        : PyCode_Addr2Line(code, lasti);
        Py_XDECREF(filename);
        Py_XDECREF(name);
        *is_skipped = skipped(info->filename);
        // Interned code objects live forever so their address stays unique.
        Py_INCREF(code);
      });
  e.code = key;
  e.lasti = lasti;
  e.id = id;
  e.skip = *skip;
  return id;
}

// The stack node of frame ids `ids` (innermost first).
uint32_t intern_stack(CaptureCache& c, StackTable& table, const uint32_t* ids, int n) {
  if (n == 0) return 0;
  // The tree is rooted at the outermost captured frame: compare with the
  // last stack from the outside in, and intern only below the shared prefix.
  uint32_t outer_first[kMaxDepth];
  int same = 0;
  for (int i = 0; i < n; ++i) {
    outer_first[i] = ids[n - 1 - i];
    if (same == i && i < c.path_n && c.path_frames[i] == outer_first[i]) same = i + 1;
  }
  if (same == n) return c.path_nodes[n - 1];  // the last stack or a prefix of it
  uint32_t parent = same ? c.path_nodes[same - 1] : 0;
  uint32_t node = table.intern_from(parent, outer_first + same, static_cast<size_t>(n - same),
                                    c.path_nodes + same);
  for (int i = same; i < n; ++i) c.path_frames[i] = outer_first[i];
  c.path_n = n;
  return node;
}
}  // namespace

uint32_t capture_python_stack(int max_depth) {
  if (max_depth <= 0) return 0;
  if (max_depth > kMaxDepth) max_depth = kMaxDepth;
  uint32_t ids[kMaxDepth];
  int n = 0;
  StackTable& table = stack_table();
  CaptureCache& c = cache();
  // A bounded walk: skipped frames (torchmem's own) do not count towards the
  // depth, but a pathological stack cannot make us walk forever.
  if (interpreter_frames_readable()) {
    const void* f = innermost_frame();
    for (int walked = 0; f && n < max_depth && walked < 4 * kMaxDepth; ++walked) {
      PyCodeObject* code = frame_code(f);
      bool skip = false;
      uint32_t id = frame_id_of(c, table, code, frame_lasti(f), nullptr, &skip);
      if (!skip) ids[n++] = id;
      f = calling_frame(f);
    }
    return intern_stack(c, table, ids, n);
  }
  PyFrameObject* frame = PyEval_GetFrame();  // borrowed
  Py_XINCREF(frame);
  for (int walked = 0; frame && n < max_depth && walked < 4 * kMaxDepth; ++walked) {
    PyCodeObject* code = PyFrame_GetCode(frame);  // new reference
    bool skip = false;
    uint32_t id = frame_id_of(c, table, code, PyFrame_GetLasti(frame), frame, &skip);
    Py_DECREF(code);
    if (!skip) ids[n++] = id;
    PyFrameObject* back = PyFrame_GetBack(frame);  // new reference
    Py_DECREF(frame);
    frame = back;
  }
  Py_XDECREF(frame);
  return intern_stack(c, table, ids, n);
}

// torch calls allocators with the GIL released (its op bindings drop it),
// so the stack of the Python code behind an allocation is only readable with
// the GIL taken back. Rules: only when capture is on and a recorder listens;
// never during interpreter shutdown (PyGILState_Ensure would hang a daemon
// thread); never on a thread that has never run Python (autograd's device
// threads, NCCL's): such a thread has no Python frames, and taking the GIL
// there would build and tear down a thread state for nothing. We hold no
// lock of ours here. torch's own _record_memory_history(stacks="python")
// takes the GIL at the same point of its allocator.
uint32_t capture_stack_in_allocator() {
  if (!stack_capture_enabled()) return 0;
  if (!Py_IsInitialized()) return 0;
#if PY_VERSION_HEX >= 0x030D0000
  if (Py_IsFinalizing()) return 0;
#else
  if (_Py_IsFinalizing()) return 0;
#endif
  if (PyGILState_GetThisThreadState() == nullptr) return 0;
  PyGILState_STATE state = PyGILState_Ensure();
  uint32_t id = capture_python_stack(stack_capture_depth());
  PyGILState_Release(state);
  return id;
}

}  // namespace torchmem
