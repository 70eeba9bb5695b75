// Point-cloud voxelization on CPU (jsparse.ops.voxelize): spconv 2.3's PointToVoxel, jittable.
//
// Two handlers, called one after the other (parallel.h: one parallel phase per call):
// 1. jsparse_voxelize_assign: first-come voxel ids. Ids follow the order in which points open
//    voxels, an inherently sequential rule, so one task (the inserter) walks the points in order
//    through an open-addressing table of packed cell keys, while the other tasks compute the cell
//    keys of later chunks of points ahead of it and then zero voxel rows from the last one down.
//    The inserter writes only sequential streams: every point's id and each voxel's first point.
// 2. jsparse_voxelize_store: tasks over ranges of voxel rows write their rows front to back:
//    zeros where the assign handler did not write them, then the stored points (found by
//    scanning the ids from the row range's first point) while those lines are in cache, the
//    empty_mean means, the coords (the cell of each voxel's first point), and padding past the
//    opened voxels (coords -1, count 0).
// Neither handler zeroes pages the kernel reports as never written (memory.h, KnownZeroPages):
// when malloc maps the voxels anew, the padding rows are then never touched at all.
// No output depends on which thread ran what, so outputs are bitwise identical for any thread
// count. Points with a non-finite or out-of-range cell, and rows at or past num_points, get id -1;
// points that would open a voxel past max_num_voxels get id -1 but are counted in num_voxels.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../common/hash.h"
#include "../common/registry.h"
#include "cpu_isa.h"
#include "errors.h"
#include "memory.h"
#include "parallel.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int kMaxVoxelNdim = 4;
constexpr uint64_t kEmptyKey = ~0ull;  // cell keys stay below 2**62
constexpr int64_t kCellChunk = 1024;   // points per chunk of cell keys handed to the inserter
constexpr int64_t kPrefetchAhead = 16;  // table slots prefetched ahead of the inserter
constexpr int64_t kRowChunkFloats = int64_t{1} << 16;  // voxel floats per row task (256 KiB)

// The static geometry, in the handler's axis order (xyz, as the attributes give it).
struct VoxelGeometry {
  int ndim;
  float vsize[kMaxVoxelNdim];
  float low[kMaxVoxelNdim];
  int64_t grid[kMaxVoxelNdim];
  uint64_t stride[kMaxVoxelNdim];  // key = sum(cell[a] * stride[a]): x fastest, as zyx row-major
  uint64_t cells;                  // prod(grid)
};

// Open-addressing tables from cell key to voxel row (-1: a voxel past max_num_voxels, counted but
// never stored). Both have the same interface; InsertPoints takes either.
//
// Grids of at most 2**32 cells (all common ones) pack key and voxel into one 8-byte slot, halving
// the table's memory traffic. 0 marks an empty slot.
struct PackedTable {
  using Slot = uint64_t;
  static bool Fits(uint64_t cells) { return cells <= (uint64_t{1} << 32); }
  static Slot Empty() { return 0; }
  static bool IsEmpty(Slot s) { return s == 0; }
  static bool Holds(Slot s, uint64_t key) { return s != 0 && static_cast<uint32_t>(s) == key; }
  static Slot Make(uint64_t key, int32_t voxel) { return (static_cast<uint64_t>(voxel + 2) << 32) | key; }
  static int32_t Voxel(Slot s) { return static_cast<int32_t>((s >> 32) - 2); }
};

// Any grid: 16-byte slots; kEmptyKey marks an empty slot.
struct WideTable {
  struct Slot {
    uint64_t key;
    int32_t voxel;
  };
  static bool Fits(uint64_t) { return true; }
  static Slot Empty() { return Slot{kEmptyKey, 0}; }
  static bool IsEmpty(const Slot& s) { return s.key == kEmptyKey; }
  static bool Holds(const Slot& s, uint64_t key) { return s.key == key; }
  static Slot Make(uint64_t key, int32_t voxel) { return Slot{key, voxel}; }
  static int32_t Voxel(const Slot& s) { return s.voxel; }
};

// Cell keys computed ahead of the inserter, a chunk of kCellChunk points at a time. A chunk is
// claimed by one task (pending -> running), computed, then published (ready). The inserter never
// waits for a pending chunk: it claims and computes it itself, so it only ever waits for a chunk
// that a running task is computing (and meanwhile computes later chunks), and the phase completes
// with any number of threads.
struct CellKeys {
  enum State : int32_t { kPending, kRunning, kReady };

  // Carves the arrays (and the inserter's table of `table_bytes`) out of one scratch block.
  CellKeys(int64_t points, size_t table_bytes)
      : num_chunks((points + kCellChunk - 1) / kCellChunk), scratch(AcquireScratch(Bytes(points, table_bytes))) {
    std::byte* next = scratch.get();
    auto carve = [&next](size_t bytes) {
      std::byte* start = next;
      next += (bytes + 63) / 64 * 64;
      return start;
    };
    key = reinterpret_cast<uint64_t*>(carve(points * sizeof(uint64_t)));
    slot = reinterpret_cast<uint64_t*>(carve(points * sizeof(uint64_t)));
    table = carve(table_bytes);
    state = new (carve(num_chunks * sizeof(std::atomic<int32_t>))) std::atomic<int32_t>[num_chunks];
    for (int64_t c = 0; c < num_chunks; ++c) state[c].store(kPending, std::memory_order_relaxed);
  }
  static size_t Bytes(int64_t points, size_t table_bytes) {
    const int64_t chunks = (points + kCellChunk - 1) / kCellChunk;
    return 4 * 64 + points * 2 * sizeof(uint64_t) + table_bytes + chunks * sizeof(std::atomic<int32_t>);
  }

  bool Claim(int64_t chunk) {
    int32_t expected = kPending;
    return state[chunk].compare_exchange_strong(expected, kRunning, std::memory_order_relaxed);
  }
  void Publish(int64_t chunk) { state[chunk].store(kReady, std::memory_order_release); }
  bool Ready(int64_t chunk) const { return state[chunk].load(std::memory_order_acquire) == kReady; }

  const int64_t num_chunks;
  std::atomic<int64_t> next_chunk{0};  // the helpers' cursor
  std::shared_ptr<std::byte> scratch;
  uint64_t* key;   // [P] packed cell, kEmptyKey outside the grid
  uint64_t* slot;  // [P] first table slot; the always-empty sentinel if outside the grid
  std::byte* table;  // the inserter's
  std::atomic<int32_t>* state;  // [chunks]
};

// First table slot of a cell key: a 32-bit mix (vector lanes multiply 32-bit integers), with
// keys that differ only in their 3 lowest bits (x neighbours, as along a scan line) in one 8-slot
// group, a cache line. Keys above 32 bits fold their high bits in.
inline uint64_t VoxelSlot(uint64_t key, uint64_t mask) {
  const uint32_t folded = static_cast<uint32_t>(key >> 3) ^ static_cast<uint32_t>(key >> 35);
  return ((uint64_t{MixKey32(folded)} << 3) | (key & 7)) & mask;
}

// The cell of `value` on axis `a`: floor((value - low) / vsize) in float32 arithmetic, spconv's.
// Out-of-range, NaN and infinite quotients give 0 (the integer conversion would be undefined for
// them) and clear *inside; so does a cell past the grid.
inline int32_t AxisCell(const VoxelGeometry& g, int a, float value, bool* inside) {
  const float q = (value - g.low[a]) / g.vsize[a];
  const bool finite = (q >= 0.0f) & (q < 2147483648.0f);  // false for NaN
  const int32_t c = static_cast<int32_t>(finite ? q : 0.0f);  // q >= 0: truncation is floor
  *inside &= finite & (c < g.grid[a]);
  return c;
}

// Keys and first slots of points [begin, end): branch-free, as valid points interleave with
// invalid ones unpredictably.
template <int kNdim>
void ComputeCellKeysScalar(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                           int64_t end, uint64_t mask, CellKeys& out) {
  for (int64_t i = begin; i < end; ++i) {
    uint64_t key = 0;
    bool inside = true;
    for (int a = 0; a < kNdim; ++a) {
      key += static_cast<uint64_t>(AxisCell(g, a, points[i * features + a], &inside)) * g.stride[a];
    }
    out.key[i] = inside ? key : kEmptyKey;
    out.slot[i] = inside ? VoxelSlot(key, mask) : mask + 1;
  }
}

// GCC vector types of kLanes lanes (a vector_size cannot depend on a template parameter).
template <int kLanes>
struct KeyLanes;
template <>
struct KeyLanes<4> {
  typedef float Float __attribute__((vector_size(16)));
  typedef int32_t Int __attribute__((vector_size(16)));
  typedef uint32_t Uint __attribute__((vector_size(16)));
  typedef int64_t Int64 __attribute__((vector_size(32)));
  typedef uint64_t Uint64 __attribute__((vector_size(32)));
};
template <>
struct KeyLanes<8> {
  typedef float Float __attribute__((vector_size(32)));
  typedef int32_t Int __attribute__((vector_size(32)));
  typedef uint32_t Uint __attribute__((vector_size(32)));
  typedef int64_t Int64 __attribute__((vector_size(64)));
  typedef uint64_t Uint64 __attribute__((vector_size(64)));
};

// Keys and first slots kLanes points at a time in vector lanes (IEEE division and truncation give
// the scalar loop's bits), for grids of at most 2**32 cells and tables of at most 2**32 slots,
// whose keys and slots fit 32-bit lanes. Always inlined, so that each caller below compiles it
// for its own instruction set: 8 lanes with AVX2 (under half the time of SSE2's 4 lanes on a
// nuScenes sweep: SSE2 has no 32-bit lane multiply), else 4.
template <int kNdim, int kLanes>
__attribute__((always_inline)) inline void ComputeCellKeysInLanes(const VoxelGeometry& g, const float* points,
                                                                  int64_t features, int64_t begin, int64_t end,
                                                                  uint64_t mask, CellKeys& out) {
  using FloatLanes = typename KeyLanes<kLanes>::Float;
  using IntLanes = typename KeyLanes<kLanes>::Int;
  using UintLanes = typename KeyLanes<kLanes>::Uint;
  using Int64Lanes = typename KeyLanes<kLanes>::Int64;
  using Uint64Lanes = typename KeyLanes<kLanes>::Uint64;
  int64_t i = begin;
  if (g.cells <= (uint64_t{1} << 32) && mask < (uint64_t{1} << 32)) {
    for (; i + kLanes <= end; i += kLanes) {
      IntLanes inside = IntLanes{} - 1;
      UintLanes key = {};
      for (int a = 0; a < kNdim; ++a) {
        FloatLanes x;
        for (int j = 0; j < kLanes; ++j) x[j] = points[(i + j) * features + a];
        const FloatLanes q = (x - g.low[a]) / g.vsize[a];
        const IntLanes finite = (q >= 0.0f) & (q < 2147483648.0f);
        const IntLanes cell = __builtin_convertvector((FloatLanes)((IntLanes)q & finite), IntLanes);
        inside &= finite & (cell < static_cast<int32_t>(g.grid[a]));
        key += (UintLanes)cell * static_cast<uint32_t>(g.stride[a]);
      }
      // VoxelSlot, lane by lane.
      const UintLanes slot = ((MixKeyLanes32(key >> 3) << 3) | (key & 7)) & static_cast<uint32_t>(mask);
      // Outside the grid: kEmptyKey (all ones) and the sentinel slot.
      const Uint64Lanes keep = (Uint64Lanes)__builtin_convertvector(inside, Int64Lanes);
      const Uint64Lanes keys = __builtin_convertvector(key, Uint64Lanes) | ~keep;
      const Uint64Lanes slots = (__builtin_convertvector(slot, Uint64Lanes) & keep) | ((mask + 1) & ~keep);
      std::memcpy(out.key + i, &keys, sizeof(keys));
      std::memcpy(out.slot + i, &slots, sizeof(slots));
    }
  }
  ComputeCellKeysScalar<kNdim>(g, points, features, i, end, mask, out);
}

#if defined(__GNUC__) && defined(__x86_64__)
#define JSPARSE_VOXELIZE_AVX2 1
template <int kNdim>
__attribute__((target("avx2"))) void ComputeCellKeysAvx2(const VoxelGeometry& g, const float* points,
                                                          int64_t features, int64_t begin, int64_t end,
                                                          uint64_t mask, CellKeys& out) {
  ComputeCellKeysInLanes<kNdim, 8>(g, points, features, begin, end, mask, out);
}
#endif

template <int kNdim>
void ComputeCellKeys(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                     int64_t end, uint64_t mask, CellKeys& out) {
#ifdef JSPARSE_VOXELIZE_AVX2
  if (SelectedCpuIsa() != CpuIsa::kPortable) {
    return ComputeCellKeysAvx2<kNdim>(g, points, features, begin, end, mask, out);
  }
#endif
  ComputeCellKeysInLanes<kNdim, 4>(g, points, features, begin, end, mask, out);
}

// Outputs of the assign handler.
struct AssignOutputs {
  int32_t *ids, *first_point;
};

// The inserter: walks the points in order, claiming or awaiting each chunk of cell keys, and
// gives each point its voxel (opening one when its cell is new). It writes only sequential
// streams (ids, and the first point of each voxel it opens): per-voxel counts and
// stored points would be random read-modify-writes into fresh, uncached outputs on the one serial
// path (they took it from 0.4 to 1.0 ms on a nuScenes sweep); the store handler derives them in
// parallel. Returns how many voxels the points open (possibly more than max_voxels).
template <int kNdim, typename Table>
int64_t InsertPoints(const VoxelGeometry& g, const float* points, int64_t features, int64_t active,
                     int64_t max_voxels, typename Table::Slot* table, int64_t table_slots, CellKeys& keys,
                     const AssignOutputs& out) {
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  std::fill(table, table + table_slots + 1, Table::Empty());  // + 1: the sentinel, never filled
  int64_t opened = 0;
  // Consecutive points often share a cell (a scan line crossing a voxel): reuse the last lookup.
  uint64_t previous_key = kEmptyKey;
  int32_t previous_voxel = -1;
  for (int64_t chunk = 0; chunk < keys.num_chunks; ++chunk) {
    const int64_t begin = chunk * kCellChunk, end = std::min(active, begin + kCellChunk);
    if (keys.Claim(chunk)) {
      ComputeCellKeys<kNdim>(g, points, features, begin, end, mask, keys);
    } else {
      // A helper is computing this chunk; compute later ones meanwhile.
      for (int64_t later = chunk + 1; !keys.Ready(chunk); ++later) {
        if (later >= keys.num_chunks) {
          std::this_thread::yield();
        } else if (keys.Claim(later)) {
          const int64_t later_begin = later * kCellChunk;
          const int64_t later_end = std::min(active, later_begin + kCellChunk);
          ComputeCellKeys<kNdim>(g, points, features, later_begin, later_end, mask, keys);
          keys.Publish(later);
        }
      }
    }
    const uint64_t* key = keys.key;
    const uint64_t* first_slot = keys.slot;
    for (int64_t i = begin; i < std::min(end, begin + kPrefetchAhead); ++i) __builtin_prefetch(table + first_slot[i]);
    for (int64_t i = begin; i < end; ++i) {
      if (i + kPrefetchAhead < end) __builtin_prefetch(table + first_slot[i + kPrefetchAhead]);
      const uint64_t k = key[i];
      if (k != previous_key && k != kEmptyKey) {
        uint64_t s = first_slot[i];
        while (!Table::IsEmpty(table[s]) && !Table::Holds(table[s], k)) s = (s + 1) & mask;
        if (Table::IsEmpty(table[s])) {  // this point opens a voxel
          previous_voxel = opened < max_voxels ? static_cast<int32_t>(opened) : -1;
          table[s] = Table::Make(k, previous_voxel);
          ++opened;
          if (previous_voxel >= 0) out.first_point[previous_voxel] = static_cast<int32_t>(i);
        } else {
          previous_voxel = Table::Voxel(table[s]);
        }
        previous_key = k;
      }
      out.ids[i] = k == kEmptyKey ? -1 : previous_voxel;
    }
  }
  return opened;
}

// Whether any bit of a vector is set.
template <typename Vector>
bool AnyBitSet(Vector v) {
  static_assert(sizeof(Vector) == 16);
  uint64_t words[2];
  std::memcpy(words, &v, sizeof(v));
  return (words[0] | words[1]) != 0;
}

// Sets [begin, end) to +0.0f, writing only the 256-byte blocks that are not all zero bits already.
// Reading a block costs half the memory traffic of writing it (a clean line is never written
// back), and output memory often is zero already: malloc tends to hand back the buffer of an
// earlier result, whose padding rows are zero, a donated (reuse=) result is one, and pages
// fresh from the kernel read as zero without being allocated.
void ClearFloats(float* begin, float* end) {
  using Lanes = uint32_t __attribute__((vector_size(16)));
  constexpr int64_t kBlockFloats = 64;
  float* p = begin;
  for (; p + kBlockFloats <= end; p += kBlockFloats) {
    Lanes lanes[kBlockFloats / 4];
    std::memcpy(lanes, p, sizeof(lanes));
    Lanes any = lanes[0];
    for (int j = 1; j < kBlockFloats / 4; ++j) any |= lanes[j];
    if (AnyBitSet(any)) std::fill(p, p + kBlockFloats, 0.0f);
  }
  std::fill(p, end, 0.0f);
}

// Zeroes voxel rows from the last row down, [top, V), in blocks that tasks claim by moving `top`
// down, so the zeroed rows are one range whichever tasks ran. While the inserter runs, the other
// tasks (their cell keys done) zero any rows: all rows need zeros, padding rows and the empty
// slots of the rows in use, and this overlaps the serial insert. Once it is done, nobody zeroes
// below the rows in use (`bound`): the store handler zeroes those right before filling them,
// while they are in cache. Pages known to be zero (a buffer malloc mapped anew) are skipped.
struct RowZeroer {
  RowZeroer(float* voxels, int64_t max_voxels, int64_t row_floats, int64_t block_rows)
      : voxels(voxels), max_voxels(max_voxels), row_floats(row_floats), block_rows(block_rows), top(max_voxels) {}

  // Zeroes blocks until `top` reaches the bound.
  void ZeroToBound() {
    // The first task here asks which pages are known zero: usually a helper, while the inserter
    // runs.
    std::call_once(zero_pages_once, [this] { zero_pages.emplace(voxels, max_voxels * row_floats * sizeof(float)); });
    for (;;) {
      int64_t t = top.load(std::memory_order_relaxed);
      const int64_t start = std::max(t - block_rows, bound.load(std::memory_order_relaxed));
      if (start >= t) return;
      if (top.compare_exchange_weak(t, start, std::memory_order_relaxed)) {
        zero_pages->ForEachPartNotKnownZero(voxels + start * row_floats, voxels + t * row_floats, ClearFloats);
      }
    }
  }

  float* const voxels;
  const int64_t max_voxels, row_floats, block_rows;
  std::atomic<int64_t> top;
  std::atomic<int64_t> bound{0};  // the inserter raises it to the rows in use
  std::once_flag zero_pages_once;
  std::optional<KnownZeroPages> zero_pages;
};

template <typename Table>
int64_t InsertPointsAnyNdim(const VoxelGeometry& g, const float* points, int64_t features, int64_t active,
                            int64_t max_voxels, void* table, int64_t table_slots, CellKeys& keys,
                            const AssignOutputs& out) {
  auto* slots = static_cast<typename Table::Slot*>(table);
  switch (g.ndim) {
    case 2:
      return InsertPoints<2, Table>(g, points, features, active, max_voxels, slots, table_slots, keys, out);
    case 3:
      return InsertPoints<3, Table>(g, points, features, active, max_voxels, slots, table_slots, keys, out);
    default:
      return InsertPoints<4, Table>(g, points, features, active, max_voxels, slots, table_slots, keys, out);
  }
}

// A helper task: computes chunks of cell keys ahead of the inserter until none is left.
void HelpWithCellKeys(const VoxelGeometry& g, const float* points, int64_t features, int64_t active,
                      uint64_t mask, CellKeys& keys) {
  for (int64_t chunk; (chunk = keys.next_chunk.fetch_add(1, std::memory_order_relaxed)) < keys.num_chunks;) {
    if (!keys.Claim(chunk)) continue;
    const int64_t begin = chunk * kCellChunk, end = std::min(active, begin + kCellChunk);
    switch (g.ndim) {
      case 2:
        ComputeCellKeys<2>(g, points, features, begin, end, mask, keys);
        break;
      case 3:
        ComputeCellKeys<3>(g, points, features, begin, end, mask, keys);
        break;
      default:
        ComputeCellKeys<4>(g, points, features, begin, end, mask, keys);
    }
    keys.Publish(chunk);
  }
}

// Checks the attributes and fills `g`; returns an error message or an empty string.
std::string MakeGeometry(const std::string& op, ffi::Span<const float> vsize, ffi::Span<const float> low,
                         ffi::Span<const int64_t> grid, VoxelGeometry* g) {
  const size_t ndim = vsize.size();
  if (ndim < 2 || ndim > kMaxVoxelNdim) {
    return op + "voxel_size must have 2 to 4 entries (x, y[, z[, t]]), got " + std::to_string(ndim);
  }
  if (low.size() != ndim || grid.size() != ndim) {
    return op + "range_min and grid_size need one entry per voxel_size entry (" + std::to_string(ndim) + ")";
  }
  g->ndim = static_cast<int>(ndim);
  double cells = 1;
  uint64_t stride = 1;
  for (size_t a = 0; a < ndim; ++a) {
    if (!(vsize[a] > 0.0f) || !std::isfinite(vsize[a]) || !std::isfinite(low[a])) {
      return op + "voxel_size must be positive and finite and range_min finite on every axis";
    }
    if (grid[a] < 1 || grid[a] > INT32_MAX) {
      return op + "grid_size must be in [1, 2**31 - 1] on every axis, got " + Shape(grid);
    }
    g->vsize[a] = vsize[a];
    g->low[a] = low[a];
    g->grid[a] = grid[a];
    g->stride[a] = stride;
    stride *= static_cast<uint64_t>(grid[a]);
    cells *= static_cast<double>(grid[a]);
  }
  if (cells >= 4.0e18) return op + "the grid " + Shape(grid) + " has more cells than 64-bit keys hold";
  g->cells = stride;
  return {};
}

// Voxel rows per task of the store handler and per block the assign handler zeroes.
int64_t RowsPerBlock(int64_t row_floats) {
  return std::max<int64_t>(1, kRowChunkFloats / std::max<int64_t>(1, row_floats));
}

ffi::Future VoxelizeAssign(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer num_points,
                           ffi::AnyBuffer /*reused_voxels*/, ffi::Span<const float> vsize, ffi::Span<const float> low,
                           ffi::Span<const int64_t> grid, ffi::Result<ffi::AnyBuffer> voxels_out,
                           ffi::Result<ffi::AnyBuffer> ids_out,
                           ffi::Result<ffi::AnyBuffer> first_point_out, ffi::Result<ffi::AnyBuffer> num_voxels_out,
                           ffi::Result<ffi::AnyBuffer> zeroed_from_out) {
  const std::string op = "jsparse_voxelize_assign: ";
  auto g = std::make_shared<VoxelGeometry>();
  std::string message = MakeGeometry(op, vsize, low, grid, g.get());
  const auto pd = points.dimensions();
  const auto vd = voxels_out->dimensions();
  if (message.empty() && (points.element_type() != ffi::F32 || pd.size() != 2 || pd[1] < g->ndim)) {
    message = op + "points must be float32 [P, F] with F >= " + std::to_string(g->ndim) +
              " (coordinates first), got shape " + Shape(pd);
  }
  if (message.empty() && pd[0] > INT32_MAX) message = op + "more points than int32 ids reach";
  if (message.empty() && (num_points.element_type() != ffi::S32 || num_points.dimensions().size() != 0)) {
    message = op + "num_points must be an int32 scalar";
  }
  if (message.empty() && (voxels_out->element_type() != ffi::F32 || vd.size() != 3 || vd[0] < 1 || vd[1] < 1 ||
                          vd[2] != pd[1] || vd[0] > INT32_MAX / vd[1])) {
    message = op + "voxels must be float32 [max_num_voxels, max_points_per_voxel, F] with both sizes >= 1, " +
              "F the points' columns and max_num_voxels * max_points_per_voxel < 2**31; got " + Shape(vd) +
              " for points " + Shape(pd);
  }
  if (message.empty()) {
    const auto id = ids_out->dimensions();
    const auto fd = first_point_out->dimensions();
    if (ids_out->element_type() != ffi::S32 || id.size() != 1 || id[0] != pd[0] ||
        first_point_out->element_type() != ffi::S32 || fd.size() != 1 || fd[0] != vd[0] ||
        num_voxels_out->element_type() != ffi::S32 || num_voxels_out->dimensions().size() != 0 ||
        zeroed_from_out->element_type() != ffi::S32 || zeroed_from_out->dimensions().size() != 0) {
      message = op + "outputs must be float32 voxels [V, M, F] and int32 pc_voxel_id [P], first_point [V], " +
                "num_voxels [], zeroed_from []";
    }
  }
  if (!message.empty()) return InvalidArgumentFuture(message);

  const int64_t num_rows = pd[0];
  const int64_t features = pd[1];
  const int64_t max_voxels = vd[0];
  const int64_t row_floats = vd[1] * vd[2];
  const int64_t active = std::clamp<int64_t>(*num_points.typed_data<int32_t>(), 0, num_rows);
  const float* pts = points.typed_data<float>();
  const AssignOutputs out{ids_out->typed_data<int32_t>(), first_point_out->typed_data<int32_t>()};
  int32_t* num_voxels = num_voxels_out->typed_data<int32_t>();
  int32_t* zeroed_from = zeroed_from_out->typed_data<int32_t>();
  std::fill(out.ids + active, out.ids + num_rows, -1);  // rows past num_points are padding
  // The table holds at most min(points, cells) distinct keys.
  const int64_t table_slots = TableSlots(static_cast<int64_t>(std::min<uint64_t>(active, g->cells)));
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  const bool packed = PackedTable::Fits(g->cells);
  const int64_t slot_bytes = packed ? sizeof(PackedTable::Slot) : sizeof(WideTable::Slot);
  auto keys = std::make_shared<CellKeys>(active, (table_slots + 1) * slot_bytes);
  auto zeroer =
      std::make_shared<RowZeroer>(voxels_out->typed_data<float>(), max_voxels, row_floats, RowsPerBlock(row_floats));
  // Task 0 inserts; the others compute cell keys ahead of it, then zero voxel rows.
  return ParallelFor(
      pool, std::max<int64_t>(1, pool.num_threads()),
      [=](int64_t task) {
        if (task > 0) {
          HelpWithCellKeys(*g, pts, features, active, mask, *keys);
          zeroer->ZeroToBound();
          return;
        }
        const int64_t opened =
            packed ? InsertPointsAnyNdim<PackedTable>(*g, pts, features, active, max_voxels, keys->table,
                                                      table_slots, *keys, out)
                   : InsertPointsAnyNdim<WideTable>(*g, pts, features, active, max_voxels, keys->table,
                                                    table_slots, *keys, out);
        *num_voxels = static_cast<int32_t>(std::min<int64_t>(opened, INT32_MAX));
        zeroer->bound.store(std::min(opened, max_voxels), std::memory_order_relaxed);
        zeroer->ZeroToBound();
      },
      [=]() { *zeroed_from = static_cast<int32_t>(zeroer->top.load(std::memory_order_relaxed)); });
}

// Voxel ids compared lane-wise (vector instructions of the baseline ISA), four vectors a block.
using IdLanes = int32_t __attribute__((vector_size(16)));
constexpr int kScanBlock = 4 * 4;

// Whether any of ids[0, kScanBlock) lies in (low, high).
bool AnyInRange(const int32_t* ids, IdLanes low, IdLanes high) {
  IdLanes lanes[4];
  std::memcpy(lanes, ids, sizeof(lanes));
  return AnyBitSet(((lanes[0] > low) & (lanes[0] < high)) | ((lanes[1] > low) & (lanes[1] < high)) |
                   ((lanes[2] > low) & (lanes[2] < high)) | ((lanes[3] > low) & (lanes[3] < high)));
}

// Voxel rows [begin, end) of the opened ones: gathers each row's stored points (its first
// max_points points, in point order) by scanning pc_voxel_id from the row's first point, copies
// them into the row's slots (kFeatures floats per point, or `features` when kFeatures is 0: the
// common widths get unrolled copies) and counts them. The rows are zero (or, with empty_mean,
// uninitialized past the stored points).
template <int kFeatures>
void StoreRows(const float* points, int64_t features, const int32_t* ids, int64_t num_ids,
               const int32_t* first_point, int64_t max_points, int64_t begin, int64_t end, float* voxels,
               int32_t* counts) {
  const int64_t f = kFeatures > 0 ? kFeatures : features;
  std::fill(counts + begin, counts + end, 0);
  const uint64_t rows = static_cast<uint64_t>(end - begin);
  auto store = [&](int64_t i) {
    const int64_t v = ids[i];
    if (static_cast<uint64_t>(v - begin) >= rows) return;  // -1 or another task's row
    const int32_t slot = counts[v];
    if (slot == max_points) return;  // the voxel is full: the point keeps its id only
    counts[v] = slot + 1;
    const float* point = points + i * f;
    float* target = voxels + (v * max_points + slot) * f;
    for (int64_t k = 0; k < f; ++k) target[k] = point[k];
  };
  // Most ids belong to other tasks' rows: test kScanBlock at a time with vector compares.
  const IdLanes low = IdLanes{} + static_cast<int32_t>(begin - 1), high = IdLanes{} + static_cast<int32_t>(end);
  int64_t i = first_point[begin];
  for (; i + kScanBlock <= num_ids; i += kScanBlock) {
    if (!AnyInRange(ids + i, low, high)) continue;
    for (int64_t j = i; j < i + kScanBlock; ++j) store(j);
  }
  for (; i < num_ids; ++i) store(i);
}

// Fills the empty slots of voxel rows [begin, end) with the mean of the stored points, summed in
// slot order from +0.0 (the reference path's order, so the bits agree).
void FillEmptyWithMean(const int32_t* counts, int64_t begin, int64_t end, int64_t max_points, int64_t features,
                       float* voxels) {
  std::vector<float> mean(features);
  for (int64_t v = begin; v < end; ++v) {
    float* row = voxels + v * max_points * features;
    const int64_t count = counts[v];
    std::fill(mean.begin(), mean.end(), 0.0f);
    for (int64_t j = 0; j < count; ++j) {
      for (int64_t k = 0; k < features; ++k) mean[k] += row[j * features + k];
    }
    for (int64_t k = 0; k < features; ++k) mean[k] /= static_cast<float>(count);
    for (int64_t j = count; j < max_points; ++j) std::copy(mean.begin(), mean.end(), row + j * features);
  }
}

// The cells (zyx) of voxel rows [begin, end): those of each voxel's first point.
void VoxelCoords(const VoxelGeometry& g, const float* points, int64_t features, const int32_t* first_point,
                 int64_t begin, int64_t end, int32_t* coords) {
  for (int64_t v = begin; v < end; ++v) {
    const float* point = points + int64_t{first_point[v]} * features;
    bool inside = true;
    for (int a = 0; a < g.ndim; ++a) coords[v * g.ndim + g.ndim - 1 - a] = AxisCell(g, a, point[a], &inside);
  }
}

ffi::Future VoxelizeStore(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer ids_in,
                          ffi::AnyBuffer first_point_in, ffi::AnyBuffer num_voxels, ffi::AnyBuffer zeroed_from_in,
                          ffi::AnyBuffer voxels_in, ffi::Span<const float> vsize, ffi::Span<const float> low,
                          ffi::Span<const int64_t> grid, int64_t empty_mean, ffi::Result<ffi::AnyBuffer> voxels_out,
                          ffi::Result<ffi::AnyBuffer> coords_out, ffi::Result<ffi::AnyBuffer> counts_out) {
  const std::string op = "jsparse_voxelize_store: ";
  auto g = std::make_shared<VoxelGeometry>();
  const std::string message = MakeGeometry(op, vsize, low, grid, g.get());
  if (!message.empty()) return InvalidArgumentFuture(message);
  const auto pd = points.dimensions();
  const auto id = ids_in.dimensions();
  const auto vd = voxels_out->dimensions();
  const auto cd = coords_out->dimensions();
  auto scalar = [](const ffi::AnyBuffer& b) { return b.element_type() == ffi::S32 && b.dimensions().size() == 0; };
  if (points.element_type() != ffi::F32 || pd.size() != 2 || pd[1] < g->ndim ||
      voxels_out->element_type() != ffi::F32 || vd.size() != 3 || vd[2] != pd[1] ||
      vd[0] > INT32_MAX / std::max<int64_t>(1, vd[1]) || ids_in.element_type() != ffi::S32 || id.size() != 1 ||
      id[0] != pd[0] || first_point_in.element_type() != ffi::S32 || first_point_in.dimensions().size() != 1 ||
      first_point_in.dimensions()[0] != vd[0] || !scalar(num_voxels) || !scalar(zeroed_from_in) ||
      coords_out->element_type() != ffi::S32 || cd.size() != 2 || cd[0] != vd[0] || cd[1] != g->ndim ||
      counts_out->element_type() != ffi::S32 || counts_out->dimensions().size() != 1 ||
      counts_out->dimensions()[0] != vd[0] || voxels_in.untyped_data() != voxels_out->untyped_data()) {
    return InvalidArgumentFuture(
        op + "expects float32 points [P, F] and the int32 pc_voxel_id [P], first_point [V], num_voxels [] " +
        "and zeroed_from [] of jsparse_voxelize_assign, and completes its voxels [V, M, F] in place " +
        "(aliased), returning int32 coords [V, ndim] and counts [V]; got points " + Shape(pd) +
        ", pc_voxel_id " + Shape(id) + ", voxels " + Shape(vd) + ", coords " + Shape(cd));
  }
  const int64_t features = pd[1];
  const int64_t max_voxels = vd[0];
  const int64_t max_points = vd[1];
  const int64_t ndim = g->ndim;
  const int64_t row_floats = max_points * features;
  const int64_t used = std::clamp<int64_t>(*num_voxels.typed_data<int32_t>(), 0, max_voxels);
  const int64_t zeroed_from = std::clamp<int64_t>(*zeroed_from_in.typed_data<int32_t>(), 0, max_voxels);
  const int64_t rows_end = std::max(used, zeroed_from);  // rows past it are zero padding
  const bool mean = empty_mean != 0;
  const int64_t rows_per_task = RowsPerBlock(row_floats);
  const int64_t row_tasks = (rows_end + rows_per_task - 1) / rows_per_task;
  const float* pts = points.typed_data<float>();
  const int32_t* ids = ids_in.typed_data<int32_t>();
  const int32_t* first_point = first_point_in.typed_data<int32_t>();
  const int64_t num_ids = id[0];
  float* voxels = voxels_out->typed_data<float>();
  int32_t* coords = coords_out->typed_data<int32_t>();
  int32_t* counts = counts_out->typed_data<int32_t>();
  std::fill(coords + rows_end * ndim, coords + max_voxels * ndim, -1);
  std::fill(counts + rows_end, counts + max_voxels, 0);
  auto zero_pages = std::make_shared<const KnownZeroPages>(voxels, rows_end * row_floats * sizeof(float));
  return ParallelFor(pool, std::max<int64_t>(1, row_tasks), [=](int64_t task) {
    // Rows [begin, end) front to back: zeros in one pass where the assign handler did not write
    // them (with empty_mean only past the opened voxels: the mean fills their empty slots), then
    // the stored points, into lines still in cache, the means, the coords, and padding coords and
    // counts past the opened voxels.
    const int64_t begin = task * rows_per_task;
    const int64_t end = std::min(rows_end, begin + rows_per_task);
    const int64_t opened_end = std::clamp(used, begin, end);
    const int64_t zero_end = std::min(end, zeroed_from);
    // Rows in use are written without ClearFloats's check: stored points land in most of their
    // 256-byte blocks, so it would save no writes, and reading a page fresh from the kernel
    // before writing it costs two page faults (the shared zero page, then a copy) instead of
    // one. Padding rows are checked: they often are zero already. Neither is zeroed on pages
    // known to be zero.
    auto fill_zeros = [](float* part_begin, float* part_end) { std::fill(part_begin, part_end, 0.0f); };
    if (!mean) {
      zero_pages->ForEachPartNotKnownZero(voxels + begin * row_floats,
                                          voxels + std::min(opened_end, zero_end) * row_floats, fill_zeros);
    }
    zero_pages->ForEachPartNotKnownZero(voxels + opened_end * row_floats, voxels + zero_end * row_floats, ClearFloats);
    if (begin < opened_end) {
      switch (features) {
        case 4:
          StoreRows<4>(pts, features, ids, num_ids, first_point, max_points, begin, opened_end, voxels, counts);
          break;
        case 5:
          StoreRows<5>(pts, features, ids, num_ids, first_point, max_points, begin, opened_end, voxels, counts);
          break;
        default:
          StoreRows<0>(pts, features, ids, num_ids, first_point, max_points, begin, opened_end, voxels, counts);
      }
      if (mean) FillEmptyWithMean(counts, begin, opened_end, max_points, features, voxels);
      VoxelCoords(*g, pts, features, first_point, begin, opened_end, coords);
    }
    std::fill(coords + opened_end * ndim, coords + end * ndim, -1);
    std::fill(counts + opened_end, counts + end, 0);
  });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeAssignCpu, jsparse::VoxelizeAssign,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()                      // the XLA intra-op pool (cell keys ahead of the inserter)
        .Arg<ffi::AnyBuffer>()                       // points [P, F] float32, x, y[, z[, t]] first
        .Arg<ffi::AnyBuffer>()                       // num_points [] int32: rows past it are padding
        .Arg<ffi::AnyBuffer>()                       // reused voxels: never read; aliased to the voxels
                                                     // result when the caller donates an old one
        .Attr<ffi::Span<const float>>("voxel_size")  // [ndim] float32, xyz order
        .Attr<ffi::Span<const float>>("range_min")   // [ndim] float32, xyz order
        .Attr<ffi::Span<const int64_t>>("grid_size")  // [ndim], xyz order
        .Ret<ffi::AnyBuffer>()                       // voxels [V, M, F] float32: rows >= zeroed_from zero
        .Ret<ffi::AnyBuffer>()                       // pc_voxel_id [P] int32, -1 when not voxelized
        .Ret<ffi::AnyBuffer>()                       // first_point [V] int32: the point opening each voxel
        .Ret<ffi::AnyBuffer>()                       // num_voxels [] int32, may exceed V
        .Ret<ffi::AnyBuffer>());                     // zeroed_from [] int32: the first zeroed voxel row

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeStoreCpu, jsparse::VoxelizeStore,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()                      // the XLA intra-op pool (over ranges of voxel rows)
        .Arg<ffi::AnyBuffer>()                       // points [P, F] float32
        .Arg<ffi::AnyBuffer>()                       // pc_voxel_id [P] int32 (from jsparse_voxelize_assign)
        .Arg<ffi::AnyBuffer>()                       // first_point [V] int32 (from jsparse_voxelize_assign)
        .Arg<ffi::AnyBuffer>()                       // num_voxels [] int32
        .Arg<ffi::AnyBuffer>()                       // zeroed_from [] int32
        .Arg<ffi::AnyBuffer>()                       // voxels [V, M, F] float32, aliased to the voxels result
        .Attr<ffi::Span<const float>>("voxel_size")  // as for jsparse_voxelize_assign
        .Attr<ffi::Span<const float>>("range_min")
        .Attr<ffi::Span<const int64_t>>("grid_size")
        .Attr<int64_t>("empty_mean")                 // 1: empty slots hold the voxel's mean
        .Ret<ffi::AnyBuffer>()                       // voxels [V, M, F] float32
        .Ret<ffi::AnyBuffer>()                       // coords [V, ndim] int32, zyx; padding rows -1
        .Ret<ffi::AnyBuffer>());                     // num_points_per_voxel [V] int32; padding rows 0

JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize_assign", JsparseVoxelizeAssignCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize_store", JsparseVoxelizeStoreCpu);
