// Open-addressing hash tables keyed by address: the live-allocation map and
// the set of recently freed addresses. Linear probing with backward-shift
// deletion keeps lookups at one or two cache lines and needs no tombstones,
// which matters because every allocation and free does a lookup.
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

namespace torchmem {

struct LiveEntry {
  uint64_t address;
  uint64_t size;
  int64_t timestamp_ns;
  uint64_t seq;        // sequence number of the allocating event
  uint32_t step;
  uint32_t stack_id;
  uint32_t thread_id;
  uint16_t type_id;
  uint16_t stream_idx;
  int16_t device;
  uint16_t context;    // the allocating thread's context (context_table.hpp)
};

inline uint64_t hash_address(uint64_t a) {
  // Allocator addresses share low bits (alignment) and high bits (arena);
  // a multiplicative mix spreads them over the table.
  a ^= a >> 33;
  a *= 0xff51afd7ed558ccdULL;
  a ^= a >> 33;
  return a;
}

// Address 0 marks an empty slot; address 0 itself is kept aside.
template <typename Value>
class AddressTable {
 public:
  AddressTable() { rehash(1024); }

  size_t size() const { return count_ + (has_zero_ ? 1 : 0); }
  size_t memory_bytes() const { return slots_.capacity() * sizeof(Slot); }

  Value* find(uint64_t key) {
    if (key == 0) return has_zero_ ? &zero_ : nullptr;
    size_t i = hash_address(key) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.key == key) return &s.value;
      if (s.key == 0) return nullptr;
      i = (i + 1) & mask_;
    }
  }
  const Value* find(uint64_t key) const {
    return const_cast<AddressTable*>(this)->find(key);
  }

  // Inserts or overwrites.
  void put(uint64_t key, const Value& value) {
    if (key == 0) {
      zero_ = value;
      has_zero_ = true;
      return;
    }
    if ((count_ + 1) * 4 > slots_.size() * 3) rehash(slots_.size() * 2);
    size_t i = hash_address(key) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.key == key) { s.value = value; return; }
      if (s.key == 0) { s.key = key; s.value = value; ++count_; return; }
      i = (i + 1) & mask_;
    }
  }

  // Removes; returns false when absent.
  bool erase(uint64_t key, Value* out = nullptr) {
    if (key == 0) {
      if (!has_zero_) return false;
      if (out) *out = zero_;
      has_zero_ = false;
      return true;
    }
    size_t i = hash_address(key) & mask_;
    while (true) {
      Slot& s = slots_[i];
      if (s.key == 0) return false;
      if (s.key == key) break;
      i = (i + 1) & mask_;
    }
    if (out) *out = slots_[i].value;
    // Backward shift: pull later members of the probe run into the hole.
    size_t hole = i;
    size_t j = i;
    while (true) {
      j = (j + 1) & mask_;
      Slot& s = slots_[j];
      if (s.key == 0) break;
      size_t home = hash_address(s.key) & mask_;
      bool movable = (hole <= j) ? (home <= hole || home > j) : (home <= hole && home > j);
      if (movable) {
        slots_[hole] = s;
        hole = j;
      }
    }
    slots_[hole].key = 0;
    --count_;
    if (slots_.size() > 1024 && count_ * 8 < slots_.size()) rehash(slots_.size() / 2);
    return true;
  }

  template <typename F>
  void for_each(F f) const {
    if (has_zero_) f(uint64_t{0}, zero_);
    for (const Slot& s : slots_)
      if (s.key != 0) f(s.key, s.value);
  }

 private:
  struct Slot {
    uint64_t key;
    Value value;
  };
  void rehash(size_t capacity) {
    std::vector<Slot> old;
    old.swap(slots_);
    slots_.assign(capacity, Slot{0, Value{}});
    mask_ = capacity - 1;
    count_ = 0;
    for (const Slot& s : old)
      if (s.key != 0) put(s.key, s.value);
  }

  std::vector<Slot> slots_;
  size_t mask_ = 0;
  size_t count_ = 0;
  bool has_zero_ = false;
  Value zero_{};
};

using LiveMap = AddressTable<LiveEntry>;

// Addresses freed recently and not allocated again, in a direct-mapped
// table (one slot per hash, newest wins): a free of one of them is a double
// free, a free of an address never seen an unknown free. A set that keeps
// every freed address costs a cache miss per free; this costs one store and
// tells the two apart for addresses among roughly the last 16K frees (an
// older double free is counted as an unknown free).
class AddressSet {
 public:
  static constexpr size_t kSlots = 1 << 14;
  AddressSet() : slots_(kSlots, kEmpty) {}
  void insert(uint64_t address) { slots_[slot(address)] = address; }
  bool contains(uint64_t address) const { return slots_[slot(address)] == address; }
  void erase(uint64_t address) {
    uint64_t& s = slots_[slot(address)];
    if (s == address) s = kEmpty;
  }
  size_t memory_bytes() const { return slots_.size() * sizeof(uint64_t); }

 private:
  static constexpr uint64_t kEmpty = ~uint64_t{0};  // above any valid address
  static size_t slot(uint64_t a) { return hash_address(a) & (kSlots - 1); }
  std::vector<uint64_t> slots_;
};

}  // namespace torchmem
