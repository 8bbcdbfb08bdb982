// Stack interning, the memray way: each distinct (code, instruction) pair is
// a frame id, each stack a node in a prefix tree of frame ids, so a stack
// costs one 32-bit id per event and is turned into text only when read.
#pragma once

#include <cstdint>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace torchmem {

struct FrameInfo {
  std::string filename;
  std::string function;
  int lineno;
};

struct StackNode {
  uint32_t parent;  // 0 = root
  uint32_t frame;   // index into frames()
};

class StackTable {
 public:
  StackTable();

  // Node id for `frames`, given outermost first. 0 for an empty stack.
  uint32_t intern(const uint32_t* frames, size_t n);
  // The same from node `parent` on (`frames` continue the stack below it);
  // writes the node of each level into `nodes` and returns the last one.
  uint32_t intern_from(uint32_t parent, const uint32_t* frames, size_t n, uint32_t* nodes);
  // Frame id for a (code object, instruction offset) key; `make` supplies
  // the text the first time the key is seen and is called without the lock.
  template <typename Make>
  uint32_t frame_id(uintptr_t code, int lasti, bool* skip, Make make);

  // Frames innermost first.
  std::vector<FrameInfo> resolve(uint32_t stack_id) const;
  // Everything interned from index `first` on, for storage.
  std::vector<FrameInfo> frames_since(uint32_t first) const;
  std::vector<StackNode> nodes_since(uint32_t first) const;
  uint32_t frame_count() const;
  uint32_t node_count() const;

 private:
  struct FrameSlot {
    uint32_t id;
    bool skip;
  };
  mutable std::mutex mu_;
  std::vector<FrameInfo> frames_;
  struct CodeKey {
    uintptr_t code;
    int lasti;
    bool operator==(const CodeKey& o) const { return code == o.code && lasti == o.lasti; }
  };
  struct CodeKeyHash {
    size_t operator()(const CodeKey& k) const {
      return std::hash<uint64_t>()(k.code * 0x9E3779B97F4A7C15ULL ^ static_cast<uint64_t>(k.lasti));
    }
  };
  // The capture code keeps every interned code object alive, so a key's
  // address can never be reused by another code object.
  std::unordered_map<CodeKey, FrameSlot, CodeKeyHash> frame_ids_;
  std::vector<StackNode> nodes_;                        // node 0 is the root
  std::unordered_map<uint64_t, uint32_t> children_;    // (parent, frame) -> node
};

template <typename Make>
uint32_t StackTable::frame_id(uintptr_t code, int lasti, bool* skip, Make make) {
  CodeKey key{code, lasti};
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = frame_ids_.find(key);
    if (it != frame_ids_.end()) {
      *skip = it->second.skip;
      return it->second.id;
    }
  }
  FrameInfo info;
  bool is_skipped = false;
  make(&info, &is_skipped);
  std::lock_guard<std::mutex> lock(mu_);
  auto it = frame_ids_.find(key);
  if (it == frame_ids_.end()) {
    uint32_t id = static_cast<uint32_t>(frames_.size());
    frames_.push_back(std::move(info));
    it = frame_ids_.emplace(key, FrameSlot{id, is_skipped}).first;
  }
  *skip = it->second.skip;
  return it->second.id;
}

}  // namespace torchmem
