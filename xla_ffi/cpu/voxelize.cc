// Point-cloud voxelization on CPU (jsparse.ops.voxelize): spconv 2.3's PointToVoxel, jittable.
//
// Two handlers, called one after the other (parallel.h: one parallel phase per call):
// 1. jsparse_voxelize_assign: first-come voxel ids. Ids follow the order in which points open
//    voxels, an inherently sequential rule, so one task (the inserter) walks the points in order
//    through an open-addressing table of packed cell keys, while the other tasks compute the cell
//    keys of later chunks of points ahead of it. It writes every point's id, every voxel's cell
//    and count, and the points each voxel stores (slot_points [V, M]: the first count entries).
// 2. jsparse_voxelize_store: tasks over ranges of voxel rows write their rows front to back:
//    zeros, the stored points copied in while those lines are in cache, and padding past the
//    opened voxels (coords -1, count 0). With empty_mean, the empty slots get the voxel's mean
//    after all tasks.
// No output depends on which thread ran what, so outputs are bitwise identical for any thread
// count. Points with a non-finite or out-of-range cell, and rows at or past num_points, get id -1;
// points that would open a voxel past max_num_voxels get id -1 but are counted in num_voxels.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <thread>
#include <vector>

#include "../common/hash.h"
#include "../common/registry.h"
#include "errors.h"
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
  CellKeys(int64_t points, int ndim, size_t table_bytes)
      : num_chunks((points + kCellChunk - 1) / kCellChunk),
        scratch(AcquireScratch(Bytes(points, ndim, table_bytes))) {
    std::byte* next = scratch.get();
    auto carve = [&next](size_t bytes) {
      std::byte* start = next;
      next += (bytes + 63) / 64 * 64;
      return start;
    };
    key = reinterpret_cast<uint64_t*>(carve(points * sizeof(uint64_t)));
    slot = reinterpret_cast<uint64_t*>(carve(points * sizeof(uint64_t)));
    cell = reinterpret_cast<int32_t*>(carve(points * ndim * sizeof(int32_t)));
    table = carve(table_bytes);
    state = new (carve(num_chunks * sizeof(std::atomic<int32_t>))) std::atomic<int32_t>[num_chunks];
    for (int64_t c = 0; c < num_chunks; ++c) state[c].store(kPending, std::memory_order_relaxed);
  }
  static size_t Bytes(int64_t points, int ndim, size_t table_bytes) {
    const int64_t chunks = (points + kCellChunk - 1) / kCellChunk;
    return 5 * 64 + points * (2 * sizeof(uint64_t) + ndim * sizeof(int32_t)) + table_bytes +
           chunks * sizeof(std::atomic<int32_t>);
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
  int32_t* cell;   // [P, ndim] in zyx order (the coords of a voxel it opens)
  std::byte* table;  // the inserter's
  std::atomic<int32_t>* state;  // [chunks]
};

// Keys, first slots and cells of points [begin, end). The float32 arithmetic is spconv's:
// floor((p - low) / vsize) per axis. Branch-free (valid points interleave with invalid ones
// unpredictably); out-of-range, NaN and infinite quotients are replaced by 0 before the integer
// conversion, which would be undefined for them.
template <int kNdim>
void ComputeCellKeys(const VoxelGeometry& g, const float* points, int64_t features, int64_t begin,
                     int64_t end, uint64_t mask, CellKeys& out) {
  for (int64_t i = begin; i < end; ++i) {
    const float* point = points + i * features;
    int32_t* cell = out.cell + i * kNdim;
    uint64_t key = 0;
    bool inside = true;
    for (int a = 0; a < kNdim; ++a) {
      const float q = (point[a] - g.low[a]) / g.vsize[a];
      const bool finite = (q >= 0.0f) & (q < 2147483648.0f);  // false for NaN
      const int32_t c = static_cast<int32_t>(finite ? q : 0.0f);  // q >= 0: truncation is floor
      inside &= finite & (c < g.grid[a]);
      cell[kNdim - 1 - a] = c;  // zyx: the reverse of the xyz axes
      key += static_cast<uint64_t>(c) * g.stride[a];
    }
    out.key[i] = inside ? key : kEmptyKey;
    out.slot[i] = inside ? SiteSlot(key, mask) : mask + 1;
  }
}

// Outputs of the assign handler.
struct AssignOutputs {
  int32_t *ids, *slot_points, *coords, *counts;
};

// The inserter: walks the points in order, claiming or awaiting each chunk of cell keys, and
// gives each point its voxel (opening one when its cell is new). Returns how many voxels the
// points open (possibly more than max_voxels).
template <int kNdim, typename Table>
int64_t InsertPoints(const VoxelGeometry& g, const float* points, int64_t features, int64_t active,
                     int64_t max_voxels, int64_t max_points, typename Table::Slot* table,
                     int64_t table_slots, CellKeys& keys, const AssignOutputs& out) {
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  std::fill(table, table + table_slots + 1, Table::Empty());  // + 1: the sentinel, never filled
  int64_t opened = 0;
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
      uint64_t s = first_slot[i];
      while (!Table::IsEmpty(table[s]) && !Table::Holds(table[s], key[i])) s = (s + 1) & mask;
      int32_t voxel = -1;
      if (key[i] != kEmptyKey) {
        if (Table::IsEmpty(table[s])) {  // this point opens a voxel
          voxel = opened < max_voxels ? static_cast<int32_t>(opened) : -1;
          table[s] = Table::Make(key[i], voxel);
          ++opened;
          if (voxel >= 0) {
            std::copy_n(keys.cell + i * kNdim, kNdim, out.coords + int64_t{voxel} * kNdim);
            out.counts[voxel] = 0;
          }
        } else {
          voxel = Table::Voxel(table[s]);
        }
      }
      out.ids[i] = voxel;
      // A voxel stores its first max_points points; later ones keep its id only.
      if (voxel >= 0 && out.counts[voxel] < max_points) {
        out.slot_points[int64_t{voxel} * max_points + out.counts[voxel]++] = static_cast<int32_t>(i);
      }
    }
  }
  return opened;
}

template <typename Table>
int64_t InsertPointsAnyNdim(const VoxelGeometry& g, const float* points, int64_t features, int64_t active,
                            int64_t max_voxels, int64_t max_points, void* table, int64_t table_slots,
                            CellKeys& keys, const AssignOutputs& out) {
  auto* slots = static_cast<typename Table::Slot*>(table);
  switch (g.ndim) {
    case 2:
      return InsertPoints<2, Table>(g, points, features, active, max_voxels, max_points, slots, table_slots, keys, out);
    case 3:
      return InsertPoints<3, Table>(g, points, features, active, max_voxels, max_points, slots, table_slots, keys, out);
    default:
      return InsertPoints<4, Table>(g, points, features, active, max_voxels, max_points, slots, table_slots, keys, out);
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

ffi::Future VoxelizeAssign(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer num_points,
                           ffi::Span<const float> vsize, ffi::Span<const float> low,
                           ffi::Span<const int64_t> grid, int64_t max_points,
                           ffi::Result<ffi::AnyBuffer> coords_out, ffi::Result<ffi::AnyBuffer> counts_out,
                           ffi::Result<ffi::AnyBuffer> ids_out, ffi::Result<ffi::AnyBuffer> slot_points_out,
                           ffi::Result<ffi::AnyBuffer> num_voxels_out) {
  const std::string op = "jsparse_voxelize_assign: ";
  auto g = std::make_shared<VoxelGeometry>();
  std::string message = MakeGeometry(op, vsize, low, grid, g.get());
  const auto pd = points.dimensions();
  const auto cd = coords_out->dimensions();
  if (message.empty() && (points.element_type() != ffi::F32 || pd.size() != 2 || pd[1] < g->ndim)) {
    message = op + "points must be float32 [P, F] with F >= " + std::to_string(g->ndim) +
              " (coordinates first), got shape " + Shape(pd);
  }
  if (message.empty() && pd[0] > INT32_MAX) message = op + "more points than int32 ids reach";
  if (message.empty() && (num_points.element_type() != ffi::S32 || num_points.dimensions().size() != 0)) {
    message = op + "num_points must be an int32 scalar";
  }
  if (message.empty() && (coords_out->element_type() != ffi::S32 || cd.size() != 2 || cd[1] != g->ndim ||
                          cd[0] < 1 || max_points < 1 || cd[0] > INT32_MAX / max_points)) {
    message = op + "coords must be int32 [max_num_voxels, " + std::to_string(g->ndim) +
              "] and max_points_per_voxel >= 1, with max_num_voxels * max_points_per_voxel < 2**31; got " +
              Shape(cd) + " and " + std::to_string(max_points);
  }
  if (message.empty()) {
    const auto nd = counts_out->dimensions();
    const auto id = ids_out->dimensions();
    const auto sd = slot_points_out->dimensions();
    if (counts_out->element_type() != ffi::S32 || nd.size() != 1 || nd[0] != cd[0] ||
        ids_out->element_type() != ffi::S32 || id.size() != 1 || id[0] != pd[0] ||
        slot_points_out->element_type() != ffi::S32 || sd.size() != 2 || sd[0] != cd[0] || sd[1] != max_points ||
        num_voxels_out->element_type() != ffi::S32 || num_voxels_out->dimensions().size() != 0) {
      message = op + "outputs must be int32 coords [V, ndim], counts [V], pc_voxel_id [P], slot_points [V, M], "
                "num_voxels []";
    }
  }
  if (!message.empty()) return InvalidArgumentFuture(message);

  const int64_t num_rows = pd[0];
  const int64_t features = pd[1];
  const int64_t max_voxels = cd[0];
  const int64_t active = std::clamp<int64_t>(*num_points.typed_data<int32_t>(), 0, num_rows);
  const float* pts = points.typed_data<float>();
  const AssignOutputs out{ids_out->typed_data<int32_t>(), slot_points_out->typed_data<int32_t>(),
                          coords_out->typed_data<int32_t>(), counts_out->typed_data<int32_t>()};
  int32_t* num_voxels = num_voxels_out->typed_data<int32_t>();
  std::fill(out.ids + active, out.ids + num_rows, -1);  // rows past num_points are padding
  // The table holds at most min(points, cells) distinct keys.
  const int64_t table_slots = TableSlots(static_cast<int64_t>(std::min<uint64_t>(active, g->cells)));
  const uint64_t mask = static_cast<uint64_t>(table_slots) - 1;
  const bool packed = PackedTable::Fits(g->cells);
  const int64_t slot_bytes = packed ? sizeof(PackedTable::Slot) : sizeof(WideTable::Slot);
  auto keys = std::make_shared<CellKeys>(active, g->ndim, (table_slots + 1) * slot_bytes);
  // Task 0 inserts; the others compute cell keys ahead of it.
  return ParallelFor(pool, std::max<int64_t>(1, pool.num_threads()), [=](int64_t task) {
    if (task > 0) {
      HelpWithCellKeys(*g, pts, features, active, mask, *keys);
      return;
    }
    const int64_t opened =
        packed ? InsertPointsAnyNdim<PackedTable>(*g, pts, features, active, max_voxels, max_points, keys->table,
                                                  table_slots, *keys, out)
               : InsertPointsAnyNdim<WideTable>(*g, pts, features, active, max_voxels, max_points, keys->table,
                                                table_slots, *keys, out);
    *num_voxels = static_cast<int32_t>(std::min<int64_t>(opened, INT32_MAX));
  });
}

// Fills the empty slots of voxel rows [0, used) with the mean of the stored points, summed in
// slot order from +0.0 (the reference path's order, so the bits agree).
void FillEmptyWithMean(const int32_t* counts, int64_t used, int64_t max_points, int64_t features, float* voxels) {
  std::vector<float> mean(features);
  for (int64_t v = 0; v < used; ++v) {
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

// Copies the points stored by voxel rows [begin, end) into their slots: kFeatures floats per
// point, or `features` when kFeatures is 0 (the common widths get unrolled copies).
template <int kFeatures>
void CopyStoredPoints(const float* points, int64_t features, const int32_t* slot_points, const int32_t* counts,
                      int64_t max_points, int64_t begin, int64_t end, float* voxels) {
  const int64_t f = kFeatures > 0 ? kFeatures : features;
  for (int64_t v = begin; v < end; ++v) {
    float* row = voxels + v * max_points * f;
    const int32_t* stored = slot_points + v * max_points;
    for (int64_t j = 0; j < counts[v]; ++j) {
      const float* point = points + int64_t{stored[j]} * f;
      for (int64_t k = 0; k < f; ++k) row[j * f + k] = point[k];
    }
  }
}

ffi::Future VoxelizeStore(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer slot_points,
                          ffi::AnyBuffer num_voxels, ffi::AnyBuffer coords_in, ffi::AnyBuffer counts_in,
                          int64_t empty_mean, ffi::Result<ffi::AnyBuffer> voxels_out,
                          ffi::Result<ffi::AnyBuffer> coords_out, ffi::Result<ffi::AnyBuffer> counts_out) {
  const std::string op = "jsparse_voxelize_store: ";
  const auto pd = points.dimensions();
  const auto sd = slot_points.dimensions();
  const auto vd = voxels_out->dimensions();
  const auto cd = coords_out->dimensions();
  if (points.element_type() != ffi::F32 || pd.size() != 2 || voxels_out->element_type() != ffi::F32 ||
      vd.size() != 3 || vd[2] != pd[1] || vd[0] > INT32_MAX / std::max<int64_t>(1, vd[1]) ||
      slot_points.element_type() != ffi::S32 || sd.size() != 2 || sd[0] != vd[0] || sd[1] != vd[1] ||
      num_voxels.element_type() != ffi::S32 || num_voxels.dimensions().size() != 0 ||
      coords_out->element_type() != ffi::S32 || cd.size() != 2 || cd[0] != vd[0] ||
      counts_out->element_type() != ffi::S32 || counts_out->dimensions().size() != 1 ||
      counts_out->dimensions()[0] != vd[0] || coords_in.untyped_data() != coords_out->untyped_data() ||
      counts_in.untyped_data() != counts_out->untyped_data()) {
    return InvalidArgumentFuture(
        op + "expects float32 points [P, F] and the int32 slot_points [V, M] and num_voxels [] of " +
        "jsparse_voxelize_assign, and returns float32 voxels [V, M, F] with its int32 coords [V, ndim] " +
        "and counts [V] updated in place (aliased); got points " + Shape(pd) + ", slot_points " + Shape(sd) +
        ", voxels " + Shape(vd));
  }
  const int64_t features = pd[1];
  const int64_t max_voxels = vd[0];
  const int64_t max_points = vd[1];
  const int64_t ndim = cd[1];
  const int64_t row_size = max_points * features;
  const int64_t used = std::clamp<int64_t>(*num_voxels.typed_data<int32_t>(), 0, max_voxels);
  const bool mean = empty_mean != 0;
  const int64_t rows_per_task = std::max<int64_t>(1, kRowChunkFloats / std::max<int64_t>(1, row_size));
  const int64_t row_tasks = (max_voxels + rows_per_task - 1) / rows_per_task;
  const float* pts = points.typed_data<float>();
  const int32_t* stored = slot_points.typed_data<int32_t>();
  float* voxels = voxels_out->typed_data<float>();
  int32_t* coords = coords_out->typed_data<int32_t>();
  int32_t* counts = counts_out->typed_data<int32_t>();
  return ParallelFor(
      pool, row_tasks,
      [=](int64_t task) {
        // Rows [begin, end), front to back: zeros in one pass (with empty_mean only past the opened
        // voxels: the mean fills their empty slots), then the stored points, into lines still in
        // cache, then padding coords and counts past the opened voxels.
        const int64_t begin = task * rows_per_task;
        const int64_t end = std::min(max_voxels, begin + rows_per_task);
        const int64_t opened_end = std::clamp(used, begin, end);
        std::fill(voxels + (mean ? opened_end : begin) * row_size, voxels + end * row_size, 0.0f);
        switch (features) {
          case 4:
            CopyStoredPoints<4>(pts, features, stored, counts, max_points, begin, opened_end, voxels);
            break;
          case 5:
            CopyStoredPoints<5>(pts, features, stored, counts, max_points, begin, opened_end, voxels);
            break;
          default:
            CopyStoredPoints<0>(pts, features, stored, counts, max_points, begin, opened_end, voxels);
        }
        std::fill(coords + opened_end * ndim, coords + end * ndim, -1);
        std::fill(counts + opened_end, counts + end, 0);
      },
      [=]() {
        if (mean) FillEmptyWithMean(counts, used, max_points, features, voxels);
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
        .Attr<ffi::Span<const float>>("voxel_size")  // [ndim] float32, xyz order
        .Attr<ffi::Span<const float>>("range_min")   // [ndim] float32, xyz order
        .Attr<ffi::Span<const int64_t>>("grid_size")  // [ndim], xyz order
        .Attr<int64_t>("max_points_per_voxel")       // M
        .Ret<ffi::AnyBuffer>()                       // coords [V, ndim] int32, zyx; rows >= num_voxels unset
        .Ret<ffi::AnyBuffer>()                       // num_points_per_voxel [V] int32; rows >= num_voxels unset
        .Ret<ffi::AnyBuffer>()                       // pc_voxel_id [P] int32, -1 when not voxelized
        .Ret<ffi::AnyBuffer>()                       // slot_points [V, M] int32: a voxel's stored points, in order
        .Ret<ffi::AnyBuffer>());                     // num_voxels [] int32, may exceed V

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeStoreCpu, jsparse::VoxelizeStore,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()       // the XLA intra-op pool (over ranges of voxel rows)
        .Arg<ffi::AnyBuffer>()        // points [P, F] float32
        .Arg<ffi::AnyBuffer>()        // slot_points [V, M] int32 (from jsparse_voxelize_assign)
        .Arg<ffi::AnyBuffer>()        // num_voxels [] int32
        .Arg<ffi::AnyBuffer>()        // coords [V, ndim] int32, aliased to the coords result
        .Arg<ffi::AnyBuffer>()        // num_points_per_voxel [V] int32, aliased to the counts result
        .Attr<int64_t>("empty_mean")  // 1: empty slots hold the voxel's mean
        .Ret<ffi::AnyBuffer>()        // voxels [V, M, F] float32
        .Ret<ffi::AnyBuffer>()        // coords [V, ndim]: padding rows become -1
        .Ret<ffi::AnyBuffer>());      // num_points_per_voxel [V]: padding rows become 0

JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize_assign", JsparseVoxelizeAssignCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize_store", JsparseVoxelizeStoreCpu);
