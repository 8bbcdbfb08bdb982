// A small flat hash set of 64-bit keys, for tensor_marks.cpp.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace torchmem_marks {

// A set of 64-bit keys (addresses), open addressing sized for `n` up
// front: std::unordered_set's node per insert cost more than the rest of a
// mark's comparison.
class KeySet {
 public:
  explicit KeySet(size_t n) {
    size_t cap = 16;
    while (cap < 2 * n) cap <<= 1;
    slots_.assign(cap, 0);
  }
  // True when key was not in the set (and is now).
  bool insert(uint64_t key) {
    if (key == 0) {
      bool was = has_zero_;
      has_zero_ = true;
      return !was;
    }
    for (size_t i = slot(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i] == key) return false;
      if (slots_[i] == 0) {
        slots_[i] = key;
        return true;
      }
    }
  }
  bool contains(uint64_t key) const {
    if (key == 0) return has_zero_;
    for (size_t i = slot(key);; i = (i + 1) & (slots_.size() - 1)) {
      if (slots_[i] == key) return true;
      if (slots_[i] == 0) return false;
    }
  }

 private:
  size_t slot(uint64_t key) const {
    return size_t((key * 0x9E3779B97F4A7C15ULL) >> 17) & (slots_.size() - 1);
  }
  std::vector<uint64_t> slots_;  // 0: empty
  bool has_zero_ = false;
};

}  // namespace torchmem_marks
