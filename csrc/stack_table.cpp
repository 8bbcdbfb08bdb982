#include "stack_table.hpp"

namespace torchmem {

StackTable::StackTable() { nodes_.push_back(StackNode{0, 0}); }

uint32_t StackTable::intern(const uint32_t* frames, size_t n) {
  return intern_from(0, frames, n, nullptr);
}

uint32_t StackTable::intern_from(uint32_t parent, const uint32_t* frames, size_t n,
                                 uint32_t* nodes) {
  std::lock_guard<std::mutex> lock(mu_);
  uint32_t node = parent;
  for (size_t i = 0; i < n; ++i) {
    uint64_t key = (static_cast<uint64_t>(node) << 32) | frames[i];
    auto it = children_.find(key);
    if (it == children_.end()) {
      uint32_t id = static_cast<uint32_t>(nodes_.size());
      nodes_.push_back(StackNode{node, frames[i]});
      it = children_.emplace(key, id).first;
    }
    node = it->second;
    if (nodes) nodes[i] = node;
  }
  return node;
}

std::vector<FrameInfo> StackTable::resolve(uint32_t stack_id) const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<FrameInfo> out;
  while (stack_id != 0 && stack_id < nodes_.size()) {
    const StackNode& n = nodes_[stack_id];
    out.push_back(frames_[n.frame]);
    stack_id = n.parent;
  }
  return out;
}

std::vector<FrameInfo> StackTable::frames_since(uint32_t first) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (first >= frames_.size()) return {};
  return {frames_.begin() + first, frames_.end()};
}

std::vector<StackNode> StackTable::nodes_since(uint32_t first) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (first >= nodes_.size()) return {};
  return {nodes_.begin() + first, nodes_.end()};
}

uint32_t StackTable::frame_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint32_t>(frames_.size());
}

uint32_t StackTable::node_count() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<uint32_t>(nodes_.size());
}

}  // namespace torchmem
