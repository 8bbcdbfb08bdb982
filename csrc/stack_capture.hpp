// Capturing the Python stack of the calling thread into the process-wide
// stack table. Every function here needs the GIL.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "stack_table.hpp"

namespace torchmem {

// The one table all live profilers intern into (code objects are global).
StackTable& stack_table();

// Innermost `max_depth` frames of the caller, frames inside skipped
// directories left out; 0 when there is no Python frame. GIL required.
uint32_t capture_python_stack(int max_depth);

// For allocator hooks (any thread, GIL held or not): the caller's stack when
// capture is on and the thread runs Python, taking the GIL back for the
// walk; 0 otherwise. Never blocks during interpreter shutdown.
uint32_t capture_stack_in_allocator();

// Files under these directory prefixes are never reported as a site (the
// torchmem package itself). Takes effect for code objects seen later.
void set_skip_prefixes(std::vector<std::string> prefixes);

// Settings the CUDA plugin reads to decide whether to capture (atomics).
bool stack_capture_enabled();
int stack_capture_depth();
void set_stack_capture(bool enabled, int depth);

}  // namespace torchmem
