// jsparse.ops.HashTable's probing and inserting, shared by the CPU and CUDA handlers so that both
// build the same table bits (and the Python reference path, jsparse/ops/_hash_table.py, mirrors
// it). Open addressing with linear probing (common/hash.h): a slot is empty iff its key is
// EmptyKey<K>() (the key type's maximum), and empty slots hold the value 0.
#pragma once

#include <cstdint>
#include <type_traits>

#include "device.h"
#include "hash.h"

namespace jsparse {

// The key that marks an empty slot: iinfo(K).max. (Not std::numeric_limits: nvcc does not call
// host constexpr functions from device code without --expt-relaxed-constexpr.)
template <typename K>
JSPARSE_HD constexpr K EmptyKey() {
  static_assert(std::is_same_v<K, int32_t> || std::is_same_v<K, int64_t>, "keys are int32 or int64");
  if constexpr (std::is_same_v<K, int32_t>) {
    return INT32_MAX;
  } else {
    return INT64_MAX;
  }
}

// The slot where the probe for `key` starts.
JSPARSE_HD inline int64_t FirstSlot(int32_t key, int64_t capacity) {
  return static_cast<int64_t>(MixKey32(static_cast<uint32_t>(key)) % static_cast<uint64_t>(capacity));
}
JSPARSE_HD inline int64_t FirstSlot(int64_t key, int64_t capacity) {
  return static_cast<int64_t>(MixKey64(static_cast<uint64_t>(key)) % static_cast<uint64_t>(capacity));
}

// The slot that holds `key`, else the first empty slot on its probe path, else -1 (the table is
// full and does not hold `key`). Visits at most `capacity` slots.
template <typename K>
JSPARSE_HD int64_t ProbeSlot(const K* table_keys, int64_t capacity, K key) {
  int64_t slot = FirstSlot(key, capacity);
  for (int64_t step = 0; step < capacity; ++step) {
    const K k = table_keys[slot];
    if (k == key || k == EmptyKey<K>()) return slot;
    slot = NextSlot(slot, capacity);
  }
  return -1;
}

// The slot that holds `key`, or -1. The empty-slot marker is never found.
template <typename K>
JSPARSE_HD int64_t FindSlot(const K* table_keys, int64_t capacity, K key) {
  if (key == EmptyKey<K>()) return -1;
  const int64_t slot = ProbeSlot(table_keys, capacity, key);
  return slot >= 0 && table_keys[slot] == key ? slot : -1;
}

// *value = the value stored for `key` and *found = true, or 0 and false when it is absent.
template <typename K, typename V>
JSPARSE_HD void QueryKey(const K* table_keys, const V* table_values, int64_t capacity, K key, V* value,
                         bool* found) {
  const int64_t slot = FindSlot(table_keys, capacity, key);
  *found = slot >= 0;
  *value = slot >= 0 ? table_values[slot] : V{0};
}

// Inserts keys[i] -> values[i] for i = 0, 1, ..., n - 1 in order: an existing key gets the new
// value, a new key takes the first empty slot on its probe path. Keys that cannot be stored
// (table full, or the empty-slot marker itself) are counted in *dropped. V is the value's bits.
// Sequential by design: with linear probing the layout depends on the order of the inserts.
template <typename K, typename V>
JSPARSE_HD void ComputeInsert(K* table_keys, V* table_values, int32_t* dropped, int64_t capacity,
                              const K* keys, const V* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = keys[i] == EmptyKey<K>() ? -1 : ProbeSlot(table_keys, capacity, keys[i]);
    if (slot < 0) {
      ++*dropped;
      continue;
    }
    table_keys[slot] = keys[i];
    table_values[slot] = values[i];
  }
}

}  // namespace jsparse
