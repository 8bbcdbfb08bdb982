// The bridge between the CPU allocator hook and the recorder.
//
// The hook (src/torchmem/_hook/cpu_allocator_hook.cpp) wraps c10's CPU
// allocator. It is compiled against the installed torch at run time, so this
// module never needs torch headers; it reaches the recorder only through the
// two plain C functions below, whose addresses it is given when installed.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {
// An allocation of `size` bytes at `ptr` by the CPU allocator. Returns 1 when
// it was recorded (the hook then routes the block's free to
// torchmem_host_free), 0 when no recorder listens. Any thread, GIL or not.
int torchmem_host_alloc(void* ptr, size_t size);
// The free of a block torchmem_host_alloc recorded, logged by the recorder
// that recorded it (even if another is fed now). Called before the memory is
// released, so the address cannot be reused before its free is logged.
void torchmem_host_free(void* ptr);
}

namespace torchmem {
// Addresses of the two functions above, for handing to the hook.
uintptr_t host_alloc_fn_address();
uintptr_t host_free_fn_address();
// torchmem_host_alloc for host memory of another allocation type (pinned
// blocks from the wrapped CUDA host allocator); freed with torchmem_host_free.
int record_host_alloc(void* ptr, size_t size, uint16_t type_id);
}  // namespace torchmem
