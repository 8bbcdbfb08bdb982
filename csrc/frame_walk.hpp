// Walking the calling thread's Python frames without frame objects, for
// stack_capture.cpp (frame_walk.cpp says why). Every function needs the GIL.
#pragma once

#define PY_SSIZE_T_CLEAN
#include <Python.h>

namespace torchmem {

// Whether the functions below read this interpreter's frames (CPython 3.11);
// elsewhere the caller walks frame objects (PyEval_GetFrame, PyFrame_GetBack).
bool interpreter_frames_readable();

// Whether to read them (where readable; default on): off walks frame objects
// on any version, the baseline benchmarks/stack_depth.py measures against.
// Returns interpreter_frames_readable() after the change.
bool set_interpreter_frames(bool on);

// The innermost frame of the calling thread, and the one that called `frame`,
// as PyEval_GetFrame and PyFrame_GetBack see them (frames still being set up
// are passed over); nullptr at the end.
const void* innermost_frame();
const void* calling_frame(const void* frame);

// A frame's code object (borrowed: the frame holds it while it runs) and its
// last instruction's byte offset, as PyFrame_GetLasti gives it.
PyCodeObject* frame_code(const void* frame);
int frame_lasti(const void* frame);

}  // namespace torchmem
