#include "context_table.hpp"

#include "trace_format.hpp"

namespace torchmem {

__thread uint16_t tls_context __attribute__((tls_model("initial-exec"))) = 0;

ContextTable::ContextTable() { entries_.push_back(ContextInfo{"", 0}); }

uint16_t ContextTable::intern(const std::string& module, uint8_t phase) {
  if (phase >= format::kPhaseCount) phase = 0;
  std::string key(1, static_cast<char>(phase));
  key += module;
  std::lock_guard<std::mutex> lock(mu_);
  auto it = ids_.find(key);
  if (it != ids_.end()) return it->second;
  if (module.empty() && phase == 0) return 0;
  if (entries_.size() > UINT16_MAX) return 0;
  uint16_t id = static_cast<uint16_t>(entries_.size());
  entries_.push_back(ContextInfo{module, phase});
  ids_.emplace(std::move(key), id);
  return id;
}

std::vector<ContextInfo> ContextTable::since(uint32_t first) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (first >= entries_.size()) return {};
  return {entries_.begin() + first, entries_.end()};
}

uint32_t ContextTable::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint32_t>(entries_.size());
}

ContextTable& context_table() {
  static ContextTable* table = new ContextTable();  // never destroyed: used at exit
  return *table;
}

}  // namespace torchmem

extern "C" void torchmem_set_context(uint16_t id) { torchmem::set_current_context(id); }
extern "C" uint16_t torchmem_get_context() { return torchmem::current_context(); }
