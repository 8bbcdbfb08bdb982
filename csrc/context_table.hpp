// Attribution contexts: what a thread is doing when it allocates (the module
// running, as a path such as "Net.blocks.0.attn", and the phase: other,
// forward, backward, optimizer), interned once per process as a small id,
// the way stacks are. Python's hooks (torchmem/sources/context.py) set the
// calling thread's id when a module or phase starts and ends; the recorder
// stamps every event with it, so reading it must cost next to nothing.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace torchmem {

// The calling thread's context id; 0 = none (no module, phase "other").
// __thread, not thread_local: no init-on-first-use wrapper, so a read is one
// %fs-relative load (initial-exec, like current_thread_id's cache).
extern __thread uint16_t tls_context __attribute__((tls_model("initial-exec")));
inline uint16_t current_context() { return tls_context; }
inline void set_current_context(uint16_t id) { tls_context = id; }

}  // namespace torchmem

// set_current_context and current_context as plain C functions, for code built
// against torch at run time (torchmem/_hook/autograd_context_hook.cpp), which
// is given their addresses.
extern "C" void torchmem_set_context(uint16_t id);
extern "C" uint16_t torchmem_get_context();

namespace torchmem {

struct ContextInfo {
  std::string module;  // "" when no module runs
  uint8_t phase;       // index into format::kPhases
};

class ContextTable {
 public:
  ContextTable();
  // Id of (module, phase), interned on first sight; 0 (none) once all 65536
  // ids are taken: a model that large loses attribution, never events.
  uint16_t intern(const std::string& module, uint8_t phase);
  // Entries from id `first` on (id 0 is ("", other)).
  std::vector<ContextInfo> since(uint32_t first) const;
  uint32_t size() const;

 private:
  mutable std::mutex mu_;
  std::vector<ContextInfo> entries_;
  std::unordered_map<std::string, uint16_t> ids_;  // phase byte + module -> id
};

// The one table of the process (contexts, like code objects, are global).
ContextTable& context_table();

}  // namespace torchmem
