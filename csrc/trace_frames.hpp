// Frames of the SQLite writer's pipe protocol (src/torchmem/storage/_writer.py)
// written straight from the recorder: no Python object, no GIL needed.
#pragma once

#include <cstddef>
#include <cstdint>

namespace torchmem {

class Recorder;

// write() until all `len` bytes are out; 0, or the errno of the failure.
int write_fully(int fd, const void* data, size_t len);

// The events [start, end) still retained, as COLUMNS frames (`kind`, the
// payload length as u64 little-endian, then one column chunk; the layout is
// CHUNK_COLUMNS in _writer.py and docs/trace-format.md), one frame per
// event-log chunk. Returns 0 or the errno of a failed write; *events = the
// events sent.
int write_column_frames(Recorder& r, int fd, char kind, uint64_t start, uint64_t end,
                        uint64_t* events);

}  // namespace torchmem
