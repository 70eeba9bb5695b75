// Large output buffers on CPU.
//
// XLA allocates a fresh buffer for each large result, and the allocator often maps it anew (tens
// of MiB: past malloc's mmap threshold, or trimmed from its heap after the last call), so every
// 4 KiB page faults on first touch: up to 8192 faults for a [131072, 64] float32 conv output.
// - AdviseHugePages: for outputs a kernel writes in full. Asking the kernel for transparent huge
//   pages before the first touch turns the faults into a few 2 MiB ones (the strided C=64 conv:
//   33.6-39.6 -> 30.8-31.0 ms in an A/B; the kernel still zeroes the pages). The advice is a
//   hint: where huge pages are off it does nothing, and results never depend on it.
// - KnownZeroPages: for outputs that are mostly zeros (the voxelizer's padding rows). Pages
//   mapped anew read as zero already, so a kernel need not touch them at all.
#pragma once

#include <sys/mman.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

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

// The pages of a buffer that are known to read as zero without being touched: private anonymous
// memory that was never written since it was mapped (or since the kernel took the page back).
// When malloc maps a large result anew, every page of it is such a page, and reading it faults
// (about 1 us a page on a VM, to map the shared zero page) and writing it faults and zeroes it
// (2-3 us); a kernel that would clear rows it does not fill can skip these pages instead. Linux
// 6.11+ tells which pages they are: PROCMAP_QUERY for the mapping (anonymous, private) and
// PAGEMAP_SCAN for the pages (neither present nor swapped out). Elsewhere, and whenever a query
// fails, no page is known to be zero. Memory that userfaultfd supplies on a fault (as a CRIU
// lazy-pages restore does) is the one case this reading cannot see: JSPARSE_KNOWN_ZERO_PAGES=0
// turns the skipping off.
class KnownZeroPages {
 public:
  static constexpr uintptr_t kPageBytes = 4096;

  // Queries the pages of [data, data + bytes) (15-60 us) only if its middle page is not resident,
  // so a buffer written before (as a reused one always was) costs one mincore call. (Not its
  // first or last page: malloc writes chunk headers next to the buffer, on those pages.) Never
  // throws: any failure leaves no page known to be zero.
  KnownZeroPages(const void* data, size_t bytes) noexcept;

  // Calls fn(part_begin, part_end) for each maximal part of [begin, end) that is not on a page
  // known to be zero, in order.
  template <typename T, typename Fn>
  void ForEachPartNotKnownZero(T* begin, T* end, Fn&& fn) const {
    if (!(begin < end)) return;
    const uintptr_t first = reinterpret_cast<uintptr_t>(begin), last = reinterpret_cast<uintptr_t>(end);
    uintptr_t part = first;  // start of the pending part
    const auto before = [](const Range& r, uintptr_t address) { return r.end <= address; };
    for (auto r = std::lower_bound(zero_.begin(), zero_.end(), first, before); r != zero_.end() && r->begin < last;
         ++r) {
      const uintptr_t zero_begin = std::max(first, r->begin);
      if (part < zero_begin) fn(reinterpret_cast<T*>(part), reinterpret_cast<T*>(zero_begin));
      part = std::min(last, r->end);
    }
    if (part < last) fn(reinterpret_cast<T*>(part), end);
  }

  // How many pages are known to be zero (for tests).
  size_t count() const {
    size_t pages = 0;
    for (const Range& r : zero_) pages += (r.end - r.begin) / kPageBytes;
    return pages;
  }

 private:
  struct Range {
    uintptr_t begin, end;
  };
  std::vector<Range> zero_;  // sorted, disjoint, page-aligned
};

}  // namespace jsparse
