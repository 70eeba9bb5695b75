// Point-cloud voxelization on CPU (jsparse.ops.voxelize): spconv 2.3's PointToVoxel, jittable.
//
// One handler call, one parallel phase on the XLA intra-op pool (parallel.h), three parts:
// 1. Task 0, serial: every point's cell (float32 (p - min) / vsize, floored, per axis), then
//    first-come voxel ids from an open-addressing table of packed cell keys. Voxel ids are the
//    order in which points open voxels, an inherently sequential rule; the table is small (about
//    2 slots per point) and its probes are prefetched in groups.
// 2. Meanwhile, tasks 1.. zero the voxels output in 1 MiB chunks (mostly padding rows: the
//    output is sized for max_num_voxels).
// 3. After the last task, on the thread that ran it: each point is copied into the next free
//    slot of its voxel (so a voxel keeps its first max_points points, in point order), empty
//    slots get the voxel's mean if asked, and padding rows get coords -1.
// Every part writes outputs no other part writes at the same time, and no result depends on
// which thread ran what, so outputs are bitwise identical for any thread count.
// Points with a non-finite or out-of-range cell, and rows at or past num_points, get id -1;
// points that would open a voxel past max_num_voxels get id -1 but are counted in num_voxels.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "../common/hash.h"
#include "../common/registry.h"
#include "errors.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int kMaxVoxelNdim = 4;
constexpr uint64_t kEmptyKey = ~0ull;  // cell keys stay below 2**62
constexpr int64_t kPointGroup = 32;    // points whose table slots are prefetched together
constexpr int64_t kZeroChunk = int64_t{1} << 18;  // floats zeroed per task (1 MiB)

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
// never stored). Both have the same interface; AssignVoxels takes either.
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

// The table's memory, kept for later calls on the same thread: a fresh allocation of this size is
// returned to the OS on free and page-faults again on first touch (hundreds of faults a call).
// Only part 1 uses it, from start to end within one task on one thread.
void* TableMemory(size_t bytes) {
  thread_local std::vector<uint64_t> memory;
  if (memory.size() * sizeof(uint64_t) < bytes) memory.resize((bytes + sizeof(uint64_t) - 1) / sizeof(uint64_t));
  return memory.data();
}

// The cell key of `point` (first ndim columns are x, y, ...), or kEmptyKey when it lies outside
// the grid. The float32 arithmetic is spconv's: floor((p - low) / vsize) per axis. Branch-free
// (valid points interleave with invalid ones unpredictably); out-of-range, NaN and infinite
// quotients are replaced by 0 before the integer conversion, which would be undefined for them.
template <int kNdim>
inline uint64_t CellKey(const VoxelGeometry& g, const float* point, int32_t* cell) {
  uint64_t key = 0;
  bool inside = true;
  for (int a = 0; a < kNdim; ++a) {
    const float q = (point[a] - g.low[a]) / g.vsize[a];
    const bool finite = q >= 0.0f && q < 2147483648.0f;  // false for NaN
    const int64_t c = static_cast<int64_t>(finite ? q : 0.0f);  // q >= 0: truncation is floor
    inside &= finite & (c < g.grid[a]);
    cell[a] = static_cast<int32_t>(c);
    key += static_cast<uint64_t>(c) * g.stride[a];
  }
  return inside ? key : kEmptyKey;
}

// Inputs and outputs of part 1.
struct AssignArgs {
  const float* points;
  int64_t num_rows, features, active, max_voxels;
  int32_t *ids, *coords;
  void* table;  // table_slots slots of the Table's type
  int64_t table_slots;
};

// Part 1: ids[i] for every point and the coords of the opened voxels. Returns how many voxels the
// points open (possibly more than max_voxels).
template <int kNdim, typename Table>
int64_t AssignVoxels(const VoxelGeometry& g, const AssignArgs& args) {
  const int64_t active = args.active, max_voxels = args.max_voxels;
  const float* points = args.points;
  int32_t *ids = args.ids, *coords = args.coords;
  auto* table = static_cast<typename Table::Slot*>(args.table);
  std::fill(table, table + args.table_slots, Table::Empty());
  const uint64_t mask = static_cast<uint64_t>(args.table_slots) - 1;
  int64_t opened = 0;
  uint64_t keys[kPointGroup], slots[kPointGroup];
  int32_t cells[kPointGroup][kMaxVoxelNdim];
  std::fill(ids + active, ids + args.num_rows, -1);  // rows past num_points are padding
  for (int64_t first = 0; first < active; first += kPointGroup) {
    const int64_t n = std::min(kPointGroup, active - first);
    for (int64_t e = 0; e < n; ++e) {
      keys[e] = CellKey<kNdim>(g, points + (first + e) * args.features, cells[e]);
      slots[e] = SiteSlot(keys[e], mask);
      __builtin_prefetch(table + slots[e]);
    }
    for (int64_t e = 0; e < n; ++e) {
      const int64_t i = first + e;
      if (keys[e] == kEmptyKey) {
        ids[i] = -1;
        continue;
      }
      uint64_t s = slots[e];
      while (!Table::Holds(table[s], keys[e]) && !Table::IsEmpty(table[s])) s = (s + 1) & mask;
      if (Table::IsEmpty(table[s])) {  // this point opens a voxel
        const int32_t v = opened < max_voxels ? static_cast<int32_t>(opened) : -1;
        table[s] = Table::Make(keys[e], v);
        ++opened;
        // Coordinates in zyx order: the reverse of the xyz axes.
        if (v >= 0) {
          for (int a = 0; a < kNdim; ++a) coords[int64_t{v} * kNdim + (kNdim - 1 - a)] = cells[e][a];
        }
      }
      ids[i] = Table::Voxel(table[s]);
    }
  }
  return opened;
}

template <typename Table>
int64_t AssignVoxelsAnyNdim(const VoxelGeometry& g, const AssignArgs& args) {
  switch (g.ndim) {
    case 2:
      return AssignVoxels<2, Table>(g, args);
    case 3:
      return AssignVoxels<3, Table>(g, args);
    default:
      return AssignVoxels<4, Table>(g, args);
  }
}

// Part 3, after every task: copies each point into the next free slot of its voxel (so a voxel
// keeps its first max_points points), fills the empty slots of the used rows (they are zero; with
// empty_mean, the mean of the stored points summed in slot order) and marks the padding rows.
void StorePoints(const float* points, const int32_t* ids, int64_t active, int64_t features,
                 int64_t max_points, int64_t ndim, bool empty_mean, int64_t used, int64_t max_voxels,
                 float* voxels, int32_t* coords, int32_t* counts) {
  const int64_t row_size = max_points * features;
  for (int64_t i = 0; i < active; ++i) {
    const int32_t v = ids[i];
    if (v < 0 || counts[v] == max_points) continue;  // a full voxel's later points keep its id only
    float* slot = voxels + v * row_size + counts[v]++ * features;
    for (int64_t k = 0; k < features; ++k) slot[k] = points[i * features + k];
  }
  if (empty_mean) {
    std::vector<float> mean(features);
    for (int64_t v = 0; v < used; ++v) {
      float* row = voxels + v * row_size;
      const int64_t count = counts[v];
      std::fill(mean.begin(), mean.end(), 0.0f);
      for (int64_t j = 0; j < count; ++j) {
        for (int64_t k = 0; k < features; ++k) mean[k] += row[j * features + k];
      }
      for (int64_t k = 0; k < features; ++k) mean[k] /= static_cast<float>(count);
      for (int64_t j = count; j < max_points; ++j) {
        for (int64_t k = 0; k < features; ++k) row[j * features + k] = mean[k];
      }
    }
  }
  std::fill(coords + used * ndim, coords + max_voxels * ndim, -1);
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

ffi::Future Voxelize(ffi::ThreadPool pool, ffi::AnyBuffer points, ffi::AnyBuffer num_points,
                     ffi::Span<const float> vsize, ffi::Span<const float> low, ffi::Span<const int64_t> grid,
                     int64_t empty_mean, ffi::Result<ffi::AnyBuffer> voxels_out,
                     ffi::Result<ffi::AnyBuffer> coords_out, ffi::Result<ffi::AnyBuffer> counts_out,
                     ffi::Result<ffi::AnyBuffer> ids_out, ffi::Result<ffi::AnyBuffer> num_voxels_out) {
  const std::string op = "jsparse_voxelize: ";
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
  if (message.empty() && (voxels_out->element_type() != ffi::F32 || vd.size() != 3 || vd[0] < 1 ||
                          vd[1] < 1 || vd[2] != pd[1] || vd[0] > INT32_MAX)) {
    message = op + "voxels must be float32 [max_num_voxels, max_num_points_per_voxel, F] with both " +
              "maxima >= 1 and F = " + std::to_string(pd[1]) + ", got shape " + Shape(vd);
  }
  if (message.empty()) {
    const auto cd = coords_out->dimensions();
    const auto nd = counts_out->dimensions();
    const auto id = ids_out->dimensions();
    if (coords_out->element_type() != ffi::S32 || cd.size() != 2 || cd[0] != vd[0] || cd[1] != g->ndim ||
        counts_out->element_type() != ffi::S32 || nd.size() != 1 || nd[0] != vd[0] ||
        ids_out->element_type() != ffi::S32 || id.size() != 1 || id[0] != pd[0] ||
        num_voxels_out->element_type() != ffi::S32 || num_voxels_out->dimensions().size() != 0) {
      message = op + "outputs must be int32 coords [V, ndim], counts [V], pc_voxel_id [P], num_voxels []";
    }
  }
  if (!message.empty()) return InvalidArgumentFuture(message);

  const int64_t num_rows = pd[0];
  const int64_t features = pd[1];
  const int64_t max_voxels = vd[0];
  const int64_t max_points = vd[1];
  const int64_t active = std::clamp<int64_t>(*num_points.typed_data<int32_t>(), 0, num_rows);
  const float* pts = points.typed_data<float>();
  float* voxels = voxels_out->typed_data<float>();
  int32_t* coords = coords_out->typed_data<int32_t>();
  int32_t* counts = counts_out->typed_data<int32_t>();
  // The table holds at most min(points, cells) distinct keys.
  const int64_t table_slots = TableSlots(static_cast<int64_t>(std::min<uint64_t>(active, g->cells)));
  const bool packed = PackedTable::Fits(g->cells);
  const int64_t slot_bytes = packed ? sizeof(PackedTable::Slot) : sizeof(WideTable::Slot);
  int32_t* ids = ids_out->typed_data<int32_t>();
  int32_t* num_voxels = num_voxels_out->typed_data<int32_t>();
  const int64_t ndim = g->ndim;
  const bool mean = empty_mean != 0;
  // Task 0 assigns the ids (part 1) while the other tasks zero the voxels and counts in chunks;
  // the last task to finish stores the points (part 3). Each task writes its own outputs.
  const int64_t voxel_floats = max_voxels * max_points * features;
  const int64_t chunks = std::max<int64_t>(1, (voxel_floats + kZeroChunk - 1) / kZeroChunk);
  auto used = std::make_shared<int64_t>(0);
  return ParallelFor(
      pool, 1 + chunks,
      [=](int64_t task) {
        if (task == 0) {
          void* table = TableMemory(table_slots * slot_bytes);
          const AssignArgs args{pts, num_rows, features, active, max_voxels, ids, coords, table, table_slots};
          const int64_t opened = packed ? AssignVoxelsAnyNdim<PackedTable>(*g, args)
                                        : AssignVoxelsAnyNdim<WideTable>(*g, args);
          *num_voxels = static_cast<int32_t>(std::min<int64_t>(opened, INT32_MAX));
          *used = std::min(opened, max_voxels);
          return;
        }
        const int64_t begin = (task - 1) * kZeroChunk;
        const int64_t end = std::min(voxel_floats, begin + kZeroChunk);
        std::memset(voxels + begin, 0, (end - begin) * sizeof(float));
        if (task == 1) std::memset(counts, 0, max_voxels * sizeof(int32_t));
      },
      [=]() { StorePoints(pts, ids, active, features, max_points, ndim, mean, *used, max_voxels, voxels, coords, counts); });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeCpu, jsparse::Voxelize,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()                    // the XLA intra-op pool (parallel over voxel rows)
        .Arg<ffi::AnyBuffer>()                     // points [P, F] float32, x, y[, z[, t]] first
        .Arg<ffi::AnyBuffer>()                     // num_points [] int32: rows past it are padding
        .Attr<ffi::Span<const float>>("voxel_size")  // [ndim] float32, xyz order
        .Attr<ffi::Span<const float>>("range_min")   // [ndim] float32, xyz order
        .Attr<ffi::Span<const int64_t>>("grid_size")  // [ndim], xyz order
        .Attr<int64_t>("empty_mean")               // 1: empty slots hold the voxel's mean
        .Ret<ffi::AnyBuffer>()                     // voxels [V, M, F] float32
        .Ret<ffi::AnyBuffer>()                     // coords [V, ndim] int32, zyx order, -1 rows padding
        .Ret<ffi::AnyBuffer>()                     // num_points_per_voxel [V] int32
        .Ret<ffi::AnyBuffer>()                     // pc_voxel_id [P] int32, -1 when not voxelized
        .Ret<ffi::AnyBuffer>());                   // num_voxels [] int32, may exceed V

JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize", JsparseVoxelizeCpu);
