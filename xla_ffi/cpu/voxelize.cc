// Point-cloud voxelization on CPU (jsparse.ops.voxelize): spconv 2.3's PointToVoxel, jittable.
//
// One handler, jsparse_voxelize, whose tasks run in three stages (parallel.h: a task may wait
// for lower-numbered ones only):
// 1. cell keys, a chunk of points per task;
// 2. one task, the inserter, gives voxel ids in the order in which points open voxels (an
//    inherently sequential rule): it walks the points in order through an open-addressing table
//    of packed cell keys, writing every point's id and each voxel's first point;
// 3. tasks over ranges of voxel rows, the last rows first, write their rows front to back:
//    zeros, the stored points (found by scanning the ids from the range's first point) while
//    those lines are in cache, the empty_mean means, the coords (the cell of each voxel's first
//    point), and padding past the opened voxels (zero rows, coords -1, count 0). Rows at or past
//    the number of points are padding whatever the ids, so their tasks run while the inserter
//    does; the others wait for it.
// No output depends on which thread ran what, so outputs are bitwise identical for any thread
// count. Points with a non-finite or out-of-range cell, and rows at or past num_points, get id -1;
// points that would open a voxel past max_num_voxels get id -1 but are counted in num_voxels.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../common/hash.h"
#include "../common/registry.h"
#include "../common/voxelize.h"
#include "../common/voxelize_args.h"
#include "cpu_isa.h"
#include "errors.h"
#include "parallel.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int64_t kCellChunk = 4096;   // points per cell-key task
constexpr int64_t kPrefetchAhead = 16;  // table slots prefetched ahead of the inserter
constexpr int64_t kRowChunkFloats = int64_t{1} << 16;  // voxel floats per row task (256 KiB)

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

// Each point's packed cell key (kEmptyKey outside the grid) and first table slot (the
// always-empty sentinel outside the grid).
struct CellKeys {
  uint64_t* key;   // [P]
  uint64_t* slot;  // [P]
};

// First table slot of a cell key: a 32-bit mix (vector lanes multiply 32-bit integers), with
// keys that differ only in their 3 lowest bits (x neighbours, as along a scan line) in one 8-slot
// group, a cache line. Keys above 32 bits fold their high bits in.
inline uint64_t VoxelSlot(uint64_t key, uint64_t mask) {
  const uint32_t folded = static_cast<uint32_t>(key >> 3) ^ static_cast<uint32_t>(key >> 35);
  return ((uint64_t{MixKey32(folded)} << 3) | (key & 7)) & mask;
}

// Keys and first slots of points [begin, end) (common/voxelize.h's arithmetic): branch-free, as
// valid points interleave with invalid ones unpredictably.
template <int kNdim>
void ComputeCellKeysScalar(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                           int64_t end, uint64_t mask, const CellKeys& out) {
  for (int64_t i = begin; i < end; ++i) {
    bool inside = true;
    const uint64_t key = CellKey(g, kNdim, points + i * features, &inside);
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
// for its own instruction set: 8 lanes with AVX2, else SSE2's 4 (which lack a 32-bit lane
// multiply).
template <int kNdim, int kLanes>
__attribute__((always_inline)) inline void ComputeCellKeysInLanes(const VoxelGeometry& g, const float* points,
                                                                  int64_t features, int64_t begin, int64_t end,
                                                                  uint64_t mask, const CellKeys& out) {
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
                                                          uint64_t mask, const CellKeys& out) {
  ComputeCellKeysInLanes<kNdim, 8>(g, points, features, begin, end, mask, out);
}
#endif

template <int kNdim>
void ComputeCellKeys(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                     int64_t end, uint64_t mask, const CellKeys& out) {
#ifdef JSPARSE_VOXELIZE_AVX2
  if (SelectedCpuIsa() != CpuIsa::kPortable) {
    return ComputeCellKeysAvx2<kNdim>(g, points, features, begin, end, mask, out);
  }
#endif
  ComputeCellKeysInLanes<kNdim, 4>(g, points, features, begin, end, mask, out);
}

void ComputeCellKeysAnyNdim(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                            int64_t end, uint64_t mask, const CellKeys& out) {
  switch (g.ndim) {
    case 2:
      return ComputeCellKeys<2>(g, points, features, begin, end, mask, out);
    case 3:
      return ComputeCellKeys<3>(g, points, features, begin, end, mask, out);
    default:
      return ComputeCellKeys<4>(g, points, features, begin, end, mask, out);
  }
}

// The inserter: gives each of points [0, active) its voxel, in point order, opening one when its
// cell is new (ids[i] = -1 outside the grid or past max_voxels), and records each voxel's first
// point. Returns how many voxels the points open (possibly more than max_voxels).
template <typename Table>
int64_t InsertPoints(const CellKeys& keys, int64_t active, int64_t max_voxels, typename Table::Slot* table,
                     int64_t table_slots, int32_t* ids, int32_t* first_point) {
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  std::fill(table, table + table_slots + 1, Table::Empty());  // + 1: the sentinel, never filled
  int64_t opened = 0;
  // Consecutive points often share a cell (a scan line crossing a voxel): reuse the last lookup.
  uint64_t previous_key = kEmptyKey;
  int32_t previous_voxel = -1;
  for (int64_t i = 0; i < std::min(active, kPrefetchAhead); ++i) __builtin_prefetch(table + keys.slot[i]);
  for (int64_t i = 0; i < active; ++i) {
    if (i + kPrefetchAhead < active) __builtin_prefetch(table + keys.slot[i + kPrefetchAhead]);
    const uint64_t k = keys.key[i];
    if (k != previous_key && k != kEmptyKey) {
      uint64_t s = keys.slot[i];
      while (!Table::IsEmpty(table[s]) && !Table::Holds(table[s], k)) s = (s + 1) & mask;
      if (Table::IsEmpty(table[s])) {  // this point opens a voxel
        previous_voxel = opened < max_voxels ? static_cast<int32_t>(opened) : -1;
        table[s] = Table::Make(k, previous_voxel);
        ++opened;
        if (previous_voxel >= 0) first_point[previous_voxel] = static_cast<int32_t>(i);
      } else {
        previous_voxel = Table::Voxel(table[s]);
      }
      previous_key = k;
    }
    ids[i] = k == kEmptyKey ? -1 : previous_voxel;
  }
  return opened;
}

// Voxel ids compared lane-wise (vector instructions of the baseline ISA), four vectors a block.
using IdLanes = int32_t __attribute__((vector_size(16)));
constexpr int kScanBlock = 4 * 4;

// Whether any of ids[0, kScanBlock) lies in (low, high).
bool AnyInRange(const int32_t* ids, IdLanes low, IdLanes high) {
  IdLanes lanes[4];
  std::memcpy(lanes, ids, sizeof(lanes));
  const IdLanes any = ((lanes[0] > low) & (lanes[0] < high)) | ((lanes[1] > low) & (lanes[1] < high)) |
                      ((lanes[2] > low) & (lanes[2] < high)) | ((lanes[3] > low) & (lanes[3] < high));
  uint64_t words[2];
  std::memcpy(words, &any, sizeof(any));
  return (words[0] | words[1]) != 0;
}

// Voxel rows [begin, end) of the opened ones: gathers each row's stored points (its first
// max_points points, in point order) by scanning pc_voxel_id from the row's first point, copies
// them into the row's slots and counts them. The rows are zero (or, with empty_mean, uninitialized
// past the stored points).
void StoreRows(const float* points, int64_t features, const int32_t* ids, int64_t num_ids,
               const int32_t* first_point, int64_t max_points, int64_t begin, int64_t end, float* voxels,
               int32_t* counts) {
  std::fill(counts + begin, counts + end, 0);
  const uint64_t rows = static_cast<uint64_t>(end - begin);
  auto store = [&](int64_t i) {
    const int64_t v = ids[i];
    if (static_cast<uint64_t>(v - begin) >= rows) return;  // -1 or another task's row
    const int32_t slot = counts[v];
    if (slot == max_points) return;  // the voxel is full: the point keeps its id only
    counts[v] = slot + 1;
    const float* point = points + i * features;
    float* target = voxels + (v * max_points + slot) * features;
    for (int64_t k = 0; k < features; ++k) target[k] = point[k];
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
  for (int64_t v = begin; v < end; ++v) CellZyx(g, points + int64_t{first_point[v]} * features, coords + v * g.ndim);
}

// Voxel rows per row task.
int64_t RowsPerTask(int64_t row_floats) {
  return std::max<int64_t>(1, kRowChunkFloats / std::max<int64_t>(1, row_floats));
}

// Voxel rows [begin, end) of the row task, rows in use and padding alike: see the file comment.
void WriteRows(const VoxelGeometry& g, const float* points, int64_t features, const int32_t* ids,
               int64_t num_ids, const int32_t* first_point, int64_t used, int64_t max_points, bool mean,
               int64_t begin, int64_t end, float* voxels, int32_t* coords, int32_t* counts) {
  const int64_t row_floats = max_points * features;
  const int64_t opened_end = std::clamp(used, begin, end);
  if (begin < opened_end) {
    // With empty_mean the means fill the empty slots instead of zeros.
    if (!mean) std::fill(voxels + begin * row_floats, voxels + opened_end * row_floats, 0.0f);
    StoreRows(points, features, ids, num_ids, first_point, max_points, begin, opened_end, voxels, counts);
    if (mean) FillEmptyWithMean(counts, begin, opened_end, max_points, features, voxels);
    VoxelCoords(g, points, features, first_point, begin, opened_end, coords);
  }
  std::fill(voxels + opened_end * row_floats, voxels + end * row_floats, 0.0f);
  std::fill(coords + opened_end * g.ndim, coords + end * g.ndim, -1);
  std::fill(counts + opened_end, counts + end, 0);
}

ffi::Future Voxelize(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer num_points, ffi::AnyBuffer reused,
                     ffi::Span<const float> vsize, ffi::Span<const float> low, ffi::Span<const int64_t> grid,
                     int64_t empty_mean, ffi::Result<ffi::AnyBuffer> voxels_out, ffi::Result<ffi::AnyBuffer> coords_out,
                     ffi::Result<ffi::AnyBuffer> counts_out, ffi::Result<ffi::AnyBuffer> ids_out,
                     ffi::Result<ffi::AnyBuffer> num_voxels_out) {
  const std::string op = "jsparse_voxelize: ";
  auto g = std::make_shared<VoxelGeometry>();
  const std::string message = ValidateVoxelize(op, points, num_points, reused, vsize, low, grid, *voxels_out,
                                               *coords_out, *counts_out, *ids_out, *num_voxels_out, g.get());
  if (!message.empty()) return InvalidArgumentFuture(message);

  const int64_t num_rows = points.dimensions()[0];
  const int64_t features = points.dimensions()[1];
  const int64_t max_voxels = voxels_out->dimensions()[0];
  const int64_t max_points = voxels_out->dimensions()[1];
  const int64_t active = std::clamp<int64_t>(*num_points.typed_data<int32_t>(), 0, num_rows);
  const float* pts = points.typed_data<float>();
  float* voxels = voxels_out->typed_data<float>();
  int32_t* coords = coords_out->typed_data<int32_t>();
  int32_t* counts = counts_out->typed_data<int32_t>();
  int32_t* ids = ids_out->typed_data<int32_t>();
  int32_t* num_voxels = num_voxels_out->typed_data<int32_t>();
  const bool mean = empty_mean != 0;
  std::fill(ids + active, ids + num_rows, -1);  // rows past num_points are padding
  // The table holds at most min(points, cells) distinct keys.
  const int64_t table_slots = TableSlots(static_cast<int64_t>(std::min<uint64_t>(active, g->cells)));
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  const bool packed = PackedTable::Fits(g->cells);
  const size_t slot_bytes = packed ? sizeof(PackedTable::Slot) : sizeof(WideTable::Slot);

  // The tasks' shared state; its arrays are carved out of one scratch block.
  struct Shared {
    std::shared_ptr<std::byte> scratch;
    CellKeys keys;                      // [P] each
    void* table;                        // [table_slots + 1] slots: the last one is the sentinel
    int32_t* first_point;               // [V]
    std::atomic<int64_t> keys_done{0};  // cell-key tasks done
    std::atomic<int64_t> inserted{0};   // 1 once the inserter is done
    int64_t used = 0;                   // rows in use, min(num_voxels, V), written before `inserted`
  };
  auto shared = std::make_shared<Shared>();
  auto cache_lines = [](size_t bytes) { return (bytes + 63) / 64 * 64; };
  const size_t key_bytes = cache_lines(active * sizeof(uint64_t));
  const size_t table_bytes = cache_lines((table_slots + 1) * slot_bytes);
  shared->scratch = AcquireScratch(2 * key_bytes + table_bytes + max_voxels * sizeof(int32_t));
  std::byte* block = shared->scratch.get();
  shared->keys = CellKeys{reinterpret_cast<uint64_t*>(block), reinterpret_cast<uint64_t*>(block + key_bytes)};
  shared->table = block + 2 * key_bytes;
  shared->first_point = reinterpret_cast<int32_t*>(block + 2 * key_bytes + table_bytes);
  const int64_t key_tasks = (active + kCellChunk - 1) / kCellChunk;
  const int64_t rows_per_task = RowsPerTask(max_points * features);
  const int64_t row_tasks = (max_voxels + rows_per_task - 1) / rows_per_task;
  // Rows at or past `active` hold no voxel whatever the ids: their tasks need not wait.
  const int64_t surely_padding = std::min(active, max_voxels);
  return ParallelFor(pool, key_tasks + 1 + row_tasks, [=](int64_t task) {
    Shared& s = *shared;
    if (task < key_tasks) {
      const int64_t begin = task * kCellChunk;
      ComputeCellKeysAnyNdim(*g, pts, features, begin, std::min(active, begin + kCellChunk), mask, s.keys);
      s.keys_done.fetch_add(1, std::memory_order_release);
      return;
    }
    if (task == key_tasks) {
      AwaitCount(s.keys_done, key_tasks);
      const int64_t opened =
          packed ? InsertPoints<PackedTable>(s.keys, active, max_voxels, static_cast<PackedTable::Slot*>(s.table),
                                             table_slots, ids, s.first_point)
                 : InsertPoints<WideTable>(s.keys, active, max_voxels, static_cast<WideTable::Slot*>(s.table),
                                           table_slots, ids, s.first_point);
      *num_voxels = static_cast<int32_t>(std::min<int64_t>(opened, INT32_MAX));
      s.used = std::min(opened, max_voxels);
      s.inserted.store(1, std::memory_order_release);
      return;
    }
    // Row tasks from the last rows down.
    const int64_t j = task - key_tasks - 1;
    const int64_t end = max_voxels - j * rows_per_task;
    const int64_t begin = std::max<int64_t>(0, end - rows_per_task);
    int64_t used = 0;
    if (begin < surely_padding) {
      AwaitCount(s.inserted, 1);
      used = s.used;
    }
    WriteRows(*g, pts, features, ids, num_rows, s.first_point, used, max_points, mean, begin, end, voxels, coords,
              counts);
  });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeCpu, jsparse::Voxelize,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()                       // the XLA intra-op pool
        JSPARSE_VOXELIZE_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize", JsparseVoxelizeCpu);
