// KnownZeroPages: which pages of a buffer read as zero without being touched (memory.h).
#include "memory.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <iterator>
#include <vector>

namespace jsparse {
namespace {

#if defined(__linux__)
// struct procmap_query and its ioctl from Linux 6.11's <linux/fs.h> (a fixed ABI; older headers
// lack it, and older kernels answer the ioctl with an error).
struct ProcmapQuery {
  uint64_t size;
  uint64_t query_flags;
  uint64_t query_addr;
  uint64_t vma_start, vma_end, vma_flags, vma_page_size, vma_offset, inode;
  uint32_t dev_major, dev_minor, vma_name_size, build_id_size;
  uint64_t vma_name_addr, build_id_addr;
};
static_assert(sizeof(ProcmapQuery) == 104);
constexpr unsigned long kProcmapQuery = _IOWR('f', 17, ProcmapQuery);
constexpr uint64_t kVmaReadable = 0x01, kVmaWritable = 0x02, kVmaShared = 0x08;

// struct pm_scan_arg, struct page_region and the ioctl from Linux 6.7's <linux/fs.h>.
struct PagemapScanArg {
  uint64_t size, flags, start, end, walk_end, vec, vec_len, max_pages;
  uint64_t category_inverted, category_mask, category_anyof_mask, return_mask;
};
static_assert(sizeof(PagemapScanArg) == 96);
struct PageRegion {
  uint64_t start, end, categories;
};
constexpr unsigned long kPagemapScan = _IOWR('f', 16, PagemapScanArg);
constexpr uint64_t kPageIsPresent = 1 << 3, kPageIsSwapped = 1 << 4;

// An open file of /proc/self, closed on scope exit (opened per query: a descriptor kept open
// would describe the parent after a fork).
struct ProcFile {
  explicit ProcFile(const char* path) : fd(open(path, O_RDONLY | O_CLOEXEC)) {}
  ~ProcFile() {
    if (fd >= 0) close(fd);
  }
  const int fd;
};

// Whether pages [first, last) lie in readable, writable, private, anonymous mappings of 4 KiB
// pages (one or a few: madvise splits a mapping), where a page with no page-table entry reads as
// zero.
bool InPrivateAnonymousMappings(uintptr_t first, uintptr_t last) {
  ProcFile maps("/proc/self/maps");
  if (maps.fd < 0) return false;
  for (int mappings = 0; first < last && mappings < 16; ++mappings) {
    ProcmapQuery query{};
    query.size = sizeof(query);
    query.query_addr = first;  // the mapping that contains it
    if (ioctl(maps.fd, kProcmapQuery, &query) != 0) return false;
    const uint64_t required = kVmaReadable | kVmaWritable;
    if (query.vma_start > first || query.vma_end <= first || (query.vma_flags & required) != required ||
        (query.vma_flags & kVmaShared) || query.inode != 0 || query.dev_major != 0 || query.dev_minor != 0 ||
        query.vma_page_size != KnownZeroPages::kPageBytes) {
      return false;
    }
    first = query.vma_end;
  }
  return first >= last;
}
#endif

}  // namespace

KnownZeroPages::KnownZeroPages(const void* data, size_t bytes) noexcept {
#if defined(__linux__)
  if (bytes < 3 * kPageBytes || sysconf(_SC_PAGESIZE) != static_cast<long>(kPageBytes)) return;
  if (const char* enabled = std::getenv("JSPARSE_KNOWN_ZERO_PAGES"); enabled && std::strcmp(enabled, "0") == 0) {
    return;
  }
  const uintptr_t first = reinterpret_cast<uintptr_t>(data) & ~(kPageBytes - 1);
  const uintptr_t last = (reinterpret_cast<uintptr_t>(data) + bytes + kPageBytes - 1) & ~(kPageBytes - 1);
  unsigned char resident = 1;
  const uintptr_t middle = first + (last - first) / kPageBytes / 2 * kPageBytes;
  if (mincore(reinterpret_cast<void*>(middle), kPageBytes, &resident) != 0 || (resident & 1)) return;
  if (!InPrivateAnonymousMappings(first, last)) return;
  ProcFile pagemap("/proc/self/pagemap");
  if (pagemap.fd < 0) return;
  PageRegion regions[64];  // at most 512: the kernel's own buffer
  PagemapScanArg scan{};
  scan.size = sizeof(scan);
  scan.start = first;
  scan.end = last;
  scan.vec = reinterpret_cast<uint64_t>(regions);
  scan.vec_len = std::size(regions);
  // The pages that are neither present nor swapped out, as ranges.
  scan.category_inverted = scan.category_mask = scan.return_mask = kPageIsPresent | kPageIsSwapped;
  std::vector<Range> zero;
  try {
    while (scan.start < scan.end) {  // more than one call only if `regions` fills up
      const long found = ioctl(pagemap.fd, kPagemapScan, &scan);
      if (found < 0 || scan.walk_end <= scan.start) return;
      for (long i = 0; i < found; ++i) {
        zero.push_back(Range{static_cast<uintptr_t>(regions[i].start), static_cast<uintptr_t>(regions[i].end)});
      }
      scan.start = scan.walk_end;
    }
  } catch (...) {  // out of memory: nothing is known
    return;
  }
  zero_ = std::move(zero);
#else
  (void)data;
  (void)bytes;
#endif
}

}  // namespace jsparse
