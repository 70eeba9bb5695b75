// Scratch memory kept across handler calls.
//
// A fresh allocation of a few hundred KiB is returned to the OS when freed and page-faults again
// on first touch, which costs hundreds of faults a call (a large part of a sub-millisecond
// kernel). Handlers instead take a block from this cache and give it back when their last task
// is done; concurrent calls each hold their own block, so no two calls share memory.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

// Under AddressSanitizer (make test-sanitize) a block is poisoned but for the `bytes` its holder asked
// for, and an idle block entirely, so that accesses past a handler's scratch are reported as they
// would be for a fresh allocation.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#else
#define ASAN_POISON_MEMORY_REGION(address, size) ((void)(address), (void)(size))
#define ASAN_UNPOISON_MEMORY_REGION(address, size) ((void)(address), (void)(size))
#endif

namespace jsparse {

// Uninitialized memory of at least `bytes` bytes (64-byte aligned), returned to the cache when
// the last copy of the pointer is dropped. The cache keeps at most kMaxIdleBlocks blocks and
// kMaxIdleBytes in all; blocks beyond that are freed.
inline std::shared_ptr<std::byte> AcquireScratch(size_t bytes) {
  struct Block {
    std::unique_ptr<std::byte[]> memory;
    size_t bytes = 0;
  };
  struct Cache {
    std::mutex mutex;
    std::vector<Block> blocks;  // idle blocks
  };
  static Cache* cache = new Cache;  // never destroyed: blocks may come back during exit
  constexpr size_t kAlign = 64;
  constexpr size_t kMaxIdleBlocks = 8;
  constexpr size_t kMaxIdleBytes = size_t{256} << 20;
  Block block;
  {
    std::lock_guard<std::mutex> lock(cache->mutex);
    // The largest idle block: the one most likely to be big enough.
    auto largest = std::max_element(cache->blocks.begin(), cache->blocks.end(),
                                    [](const Block& a, const Block& b) { return a.bytes < b.bytes; });
    if (largest != cache->blocks.end()) {
      block = std::move(*largest);
      cache->blocks.erase(largest);
    }
  }
  if (block.bytes < bytes) block = Block{std::unique_ptr<std::byte[]>(new std::byte[bytes + kAlign]), bytes};
  auto address = reinterpret_cast<uintptr_t>(block.memory.get());
  auto* aligned = reinterpret_cast<std::byte*>((address + kAlign - 1) / kAlign * kAlign);
  ASAN_POISON_MEMORY_REGION(block.memory.get(), block.bytes + kAlign);
  ASAN_UNPOISON_MEMORY_REGION(aligned, bytes);
  auto held = std::make_shared<Block>(std::move(block));
  return std::shared_ptr<std::byte>(aligned, [held](std::byte*) {
    std::lock_guard<std::mutex> lock(cache->mutex);
    size_t idle = held->bytes;
    for (const Block& b : cache->blocks) idle += b.bytes;
    if (cache->blocks.size() < kMaxIdleBlocks && idle <= kMaxIdleBytes) {
      ASAN_POISON_MEMORY_REGION(held->memory.get(), held->bytes + kAlign);
      cache->blocks.push_back(std::move(*held));
    }
  });
}

}  // namespace jsparse
