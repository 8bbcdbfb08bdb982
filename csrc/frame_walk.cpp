// Reading the calling thread's Python frames the way the interpreter keeps
// them. PyEval_GetFrame and PyFrame_GetBack make a PyFrameObject for every
// frame they pass that has none (an allocation, torn down when the frame
// returns) and take references on the way: on a training step's fresh frames
// most of a stack capture's cost (issue 12, goal 5). On CPython 3.11 the
// interpreter's frame list is read instead, passing over incomplete frames
// exactly as PyFrame_GetBack does; other versions say so and stack_capture
// walks frame objects. Its own file because Py_BUILD_CORE (which the
// internal frame header requires) must not change the rest of the module.

#include "frame_walk.hpp"

#if PY_VERSION_HEX >= 0x030B0000 && PY_VERSION_HEX < 0x030C0000
#define TORCHMEM_READ_FRAMES 1
#define Py_BUILD_CORE 1
#include <internal/pycore_frame.h>
#endif

#include <atomic>

namespace torchmem {

namespace {
std::atomic<bool> g_read_frames{true};  // set_interpreter_frames
}  // namespace

#ifdef TORCHMEM_READ_FRAMES

namespace {
const _PyInterpreterFrame* complete(const _PyInterpreterFrame* f) {
  while (f != nullptr && _PyFrame_IsIncomplete(const_cast<_PyInterpreterFrame*>(f)))
    f = f->previous;
  return f;
}
const _PyInterpreterFrame* as_frame(const void* f) {
  return static_cast<const _PyInterpreterFrame*>(f);
}
}  // namespace

bool interpreter_frames_readable() { return g_read_frames.load(std::memory_order_relaxed); }

const void* innermost_frame() {
  PyThreadState* ts = PyThreadState_Get();
  return ts->cframe == nullptr ? nullptr : complete(ts->cframe->current_frame);
}

const void* calling_frame(const void* frame) { return complete(as_frame(frame)->previous); }

PyCodeObject* frame_code(const void* frame) { return as_frame(frame)->f_code; }

int frame_lasti(const void* frame) {
  int lasti = _PyInterpreterFrame_LASTI(as_frame(frame));
  return lasti < 0 ? -1 : lasti * int(sizeof(_Py_CODEUNIT));
}

#else

bool interpreter_frames_readable() { return false; }
const void* innermost_frame() { return nullptr; }
const void* calling_frame(const void*) { return nullptr; }
PyCodeObject* frame_code(const void*) { return nullptr; }
int frame_lasti(const void*) { return -1; }

#endif

bool set_interpreter_frames(bool on) {
#ifdef TORCHMEM_READ_FRAMES
  g_read_frames.store(on, std::memory_order_relaxed);
#else
  (void)on;
#endif
  return interpreter_frames_readable();
}

}  // namespace torchmem
