// Hashing shared by every open-addressing table on CPU and CUDA: the kernel-map builder and
// jsparse.ops.HashTable. The Python reference path of HashTable mirrors MixKey32/MixKey64 and
// linear probing exactly, so both backends produce the same table layout.
#pragma once

#include <cstdint>

#include "device.h"

namespace jsparse {

// MurmurHash3 finalizers: every input bit affects every output bit, so packed coordinates that
// differ in one axis land far apart. MixKeyLanes32 takes any type with 32-bit unsigned lane
// arithmetic: a uint32_t, or a vector of them (the voxelizer hashes keys in vector lanes).
template <typename Uint32Lanes>
JSPARSE_HD inline Uint32Lanes MixKeyLanes32(Uint32Lanes k) {
  k ^= k >> 16;
  k *= 0x85ebca6bu;
  k ^= k >> 13;
  k *= 0xc2b2ae35u;
  k ^= k >> 16;
  return k;
}

JSPARSE_HD inline uint32_t MixKey32(uint32_t k) { return MixKeyLanes32(k); }

JSPARSE_HD inline uint64_t MixKey64(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

// First slot of a packed site key in a power-of-two table (mask = slots - 1) for the kernel-map
// builders: keys that differ only in their 3 lowest bits (neighbours along the innermost axis)
// share an 8-slot group, one cache line of keys, so a site's taps along that axis and the next
// site's taps mostly hit lines already loaded.
JSPARSE_HD inline uint64_t SiteSlot(uint64_t key, uint64_t mask) {
  return ((MixKey64(key >> 3) << 3) | (key & 7)) & mask;
}

// Slots of an open-addressing table for up to `entries` keys: a power of two (probes wrap with
// a mask) that keeps the load factor at most 2/3.
inline int64_t TableSlots(int64_t entries) {
  int64_t slots = 16;
  while (slots < entries + entries / 2) slots *= 2;
  return slots;
}

// Linear probing: the slot after `slot` in a table of `capacity` slots.
JSPARSE_HD inline int64_t NextSlot(int64_t slot, int64_t capacity) {
  return slot + 1 == capacity ? 0 : slot + 1;
}

}  // namespace jsparse
