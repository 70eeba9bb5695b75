// Large output buffers on CPU.
//
// XLA allocates a fresh buffer for each large result, and the allocator often maps it anew (tens
// of MiB: past malloc's mmap threshold, or trimmed from its heap after the last call), so every
// 4 KiB page faults on first touch: up to 8192 faults for a [131072, 64] float32 conv output.
// Asking the kernel for transparent huge pages before the first touch turns them into a few 2 MiB
// faults (the strided C=64 conv: 33.6-39.6 -> 30.8-31.0 ms in an A/B; the kernel still zeroes the
// pages). The advice is a hint: where huge pages are off it does nothing, and results never
// depend on it.
#pragma once

#include <sys/mman.h>

#include <cstddef>
#include <cstdint>

namespace jsparse {

// Advises huge pages for the 2 MiB-aligned part of [data, data + bytes), if it is at least 4 MiB
// (smaller buffers usually come from the heap, where the advice would outlive the buffer).
inline void AdviseHugePages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (bytes < 2 * kHuge) return;
  const auto begin = (reinterpret_cast<uintptr_t>(data) + kHuge - 1) & ~(kHuge - 1);
  const auto end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace jsparse
