// Point-cloud voxelization on CUDA (jsparse.ops.voxelize): spconv 2.3's PointToVoxel with the CPU
// handler's first-come semantics (xla_ffi/cpu/voxelize.cc) and bitwise its results, deterministic
// where spconv's GPU voxelizer is not. No step depends on which thread came first:
// 1. each point's cell (common/voxelize.h, the CPU's arithmetic) goes into a hash table of cell
//    keys, whose slots keep the smallest point index of their cell (atomicMin): the voxel's first
//    point, whatever the order in which threads arrive;
// 2. each point learns its voxel's first point, and flags itself if it is that point; an exclusive
//    scan of the flags numbers the voxels in the order of their first points (first-come ids) and
//    its last entry counts them all;
// 3. each point's id is the scan's entry at its voxel's first point, or -1 (no cell, a row past
//    num_points, or a voxel past max_num_voxels);
// 4. a stable radix sort of (id, point index) lists each voxel's points in point order, and the
//    boundaries of these runs give each voxel its first sorted position and its point count;
// 5. one thread per (voxel row, feature) writes that column of the row: its first
//    max_points_per_voxel points, then zeros or the mean (summed in slot order, as on CPU); the
//    thread of feature 0 writes the row's count and coords. Padding rows get zeros, coords -1 and
//    count 0, so every output element is written and `reused` needs no special case.
// Counts stay on the device (each kernel reads num_points and the voxel count from device
// memory); the host only sizes scratch memory and asks cub for its temporary storage.
#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/hash.h"
#include "../common/registry.h"
#include "../common/voxelize.h"
#include "../common/voxelize_args.h"
#include "cuda_util.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int32_t kNoPoint = INT32_MAX;  // a table slot's first point before any point arrives

// Stage 1: the cell of each point [0, num_rows), inserted into the table (linear probing on
// table_keys, atomicMin of the point index on table_first); slot_of[i] is the point's slot, or
// -1 for a point without a cell (outside the grid, non-finite, or a row past num_points).
__global__ void InsertCellsKernel(const float* __restrict__ points, int64_t num_rows, int64_t features,
                                  const int32_t* __restrict__ num_points, const __grid_constant__ VoxelGeometry g,
                                  unsigned long long* table_keys, int32_t* table_first, uint64_t mask,
                                  int64_t* __restrict__ slot_of) {
  const int64_t requested = *num_points;
  const int64_t active = requested < 0 ? 0 : (requested > num_rows ? num_rows : requested);
  JSPARSE_GRID_LOOP(i, num_rows) {
    bool inside = i < active;
    const unsigned long long key = CellKey(g, g.ndim, points + i * features, &inside);
    if (!inside) {
      slot_of[i] = -1;
      continue;
    }
    uint64_t s = MixKey64(key) & mask;
    while (true) {
      // A filled slot never changes, so a plain load that sees a key is final; one that sees an
      // empty slot (perhaps stale) is settled by the CAS.
      unsigned long long held = table_keys[s];
      if (held == kEmptyKey) held = atomicCAS(table_keys + s, kEmptyKey, key);
      if (held == kEmptyKey || held == key) break;
      s = (s + 1) & mask;
    }
    atomicMin(table_first + s, static_cast<int32_t>(i));
    slot_of[i] = static_cast<int64_t>(s);
  }
}

// Stage 2: first_of[i] = the first point of point i's voxel (-1 without a cell) and
// opens[i] = 1 if point i is that point; opens[num_rows] = 0, so that the exclusive scan's last
// entry is the number of voxels.
__global__ void MarkFirstPointsKernel(const int64_t* __restrict__ slot_of, const int32_t* __restrict__ table_first,
                                      int64_t num_rows, int32_t* __restrict__ first_of,
                                      int32_t* __restrict__ opens) {
  JSPARSE_GRID_LOOP(i, num_rows + 1) {
    if (i == num_rows) {
      opens[i] = 0;
      continue;
    }
    const int64_t s = slot_of[i];
    const int32_t first = s < 0 ? -1 : table_first[s];
    first_of[i] = first;
    opens[i] = first == i ? 1 : 0;
  }
}

// Stage 3: ids[i] = the voxel of point i (opened_before[first point]) if it is below max_voxels,
// else -1; the sort's input pairs (id, or max_voxels for -1; point index).
__global__ void AssignIdsKernel(const int32_t* __restrict__ first_of, const int32_t* __restrict__ opened_before,
                                int64_t num_rows, int64_t max_voxels, int32_t* __restrict__ ids,
                                uint32_t* __restrict__ sort_keys, int32_t* __restrict__ sort_points) {
  JSPARSE_GRID_LOOP(i, num_rows) {
    const int32_t first = first_of[i];
    const int64_t voxel = first < 0 ? -1 : opened_before[first];
    const bool kept = voxel >= 0 && voxel < max_voxels;
    ids[i] = kept ? static_cast<int32_t>(voxel) : -1;
    sort_keys[i] = static_cast<uint32_t>(kept ? voxel : max_voxels);
    sort_points[i] = static_cast<int32_t>(i);
  }
}

// Stage 4: run_start[v] and run_end[v], the sorted positions [start, end) of voxel v's points,
// for every voxel v below max_voxels that has points (every row in use: its first point is one).
__global__ void FindRunsKernel(const uint32_t* __restrict__ sorted_keys, int64_t num_rows, int64_t max_voxels,
                               int32_t* __restrict__ run_start, int32_t* __restrict__ run_end) {
  JSPARSE_GRID_LOOP(j, num_rows) {
    const uint32_t v = sorted_keys[j];
    if (v >= max_voxels) continue;  // points without a kept voxel (sorted last)
    if (j == 0 || sorted_keys[j - 1] != v) run_start[v] = static_cast<int32_t>(j);
    if (j + 1 == num_rows || sorted_keys[j + 1] != v) run_end[v] = static_cast<int32_t>(j + 1);
  }
}

// Stage 5: every element of the outputs voxels, coords and num_points_per_voxel, one thread per
// (row, feature), and num_voxels. Rows [0, min(opened, max_voxels)) hold voxels.
__global__ void WriteRowsKernel(const float* __restrict__ points, int64_t features,
                                const __grid_constant__ VoxelGeometry g,
                                const int32_t* __restrict__ sorted_points, const int32_t* __restrict__ run_start,
                                const int32_t* __restrict__ run_end, const int32_t* __restrict__ opened_total,
                                int64_t max_voxels, int64_t max_points, bool mean, float* __restrict__ voxels,
                                int32_t* __restrict__ coords, int32_t* __restrict__ counts,
                                int32_t* __restrict__ num_voxels) {
  const int64_t opened = *opened_total;
  const int64_t used = opened < max_voxels ? opened : max_voxels;
  if (blockIdx.x == 0 && threadIdx.x == 0) *num_voxels = static_cast<int32_t>(opened);
  JSPARSE_GRID_LOOP(t, max_voxels * features) {
    const int64_t v = t / features;
    const int64_t f = t % features;
    float* column = voxels + v * max_points * features + f;  // slot m at column[m * features]
    int64_t count = 0;
    float fill = 0.0f;
    if (v < used) {
      const int64_t start = run_start[v];
      const int64_t points_in_voxel = run_end[v] - start;
      count = points_in_voxel < max_points ? points_in_voxel : max_points;
      float sum = 0.0f;
      for (int64_t m = 0; m < count; ++m) {
        const float x = points[int64_t{sorted_points[start + m]} * features + f];
        column[m * features] = x;
        sum = __fadd_rn(sum, x);
      }
      if (mean) fill = __fdiv_rn(sum, static_cast<float>(count));
      // The run starts with the voxel's first point: the sort is stable over point indices.
      if (f == 0) CellZyx(g, points + int64_t{sorted_points[start]} * features, coords + v * g.ndim);
    } else if (f == 0) {
      for (int a = 0; a < g.ndim; ++a) coords[v * g.ndim + a] = -1;
    }
    for (int64_t m = count; m < max_points; ++m) column[m * features] = fill;
    if (f == 0) counts[v] = static_cast<int32_t>(count);
  }
}

// Device scratch of one call, sized on the host from the static shapes.
struct VoxelizeScratch {
  unsigned long long* table_keys;  // [table_slots], kEmptyKey when empty
  int32_t* table_first;            // [table_slots], the smallest point index of the slot's cell
  int64_t* slot_of;                // [P]
  int32_t* first_of;               // [P]
  int32_t* opens;                  // [P + 1]
  int32_t* opened_before;          // [P + 1], its exclusive scan
  uint32_t* sort_keys;             // [P] each: the sort's input and output pairs
  uint32_t* sorted_keys;
  int32_t* sort_points;
  int32_t* sorted_points;
  int32_t* run_start;  // [V] each
  int32_t* run_end;
  std::byte* temp;     // cub's temporary storage, for the scan and then the sort
  size_t scan_bytes;
  size_t sort_bytes;
};

// Bits of the sort keys, which lie in [0, max_voxels].
int KeyBits(int64_t max_voxels) {
  int bits = 1;
  while ((int64_t{1} << bits) <= max_voxels) ++bits;
  return bits;
}

// An error cub returned, as an FFI error naming `op` (cub reports through its return value).
ffi::Error CubError(const std::string& op, cudaError_t err) {
  return ffi::Error::Internal(op + "CUDA error in cub: " + cudaGetErrorString(err));
}

// Queues stages 1 to 5 on `stream`; returns the error of a failed cub call (launch errors are
// left for LaunchError).
cudaError_t ComputeVoxelize(cudaStream_t stream, const VoxelGeometry& g, const float* points,
                            const int32_t* num_points, int64_t num_rows, int64_t features, int64_t max_voxels,
                            int64_t max_points, bool mean, int64_t table_slots, const VoxelizeScratch& s,
                            float* voxels, int32_t* coords, int32_t* counts, int32_t* ids, int32_t* num_voxels) {
  Fill(stream, s.table_keys, table_slots, static_cast<unsigned long long>(kEmptyKey));
  Fill(stream, s.table_first, table_slots, kNoPoint);
  const unsigned int point_blocks = BlocksFor(num_rows);
  InsertCellsKernel<<<point_blocks, kThreads, 0, stream>>>(points, num_rows, features, num_points, g, s.table_keys,
                                                           s.table_first, static_cast<uint64_t>(table_slots - 1),
                                                           s.slot_of);
  MarkFirstPointsKernel<<<BlocksFor(num_rows + 1), kThreads, 0, stream>>>(s.slot_of, s.table_first, num_rows,
                                                                          s.first_of, s.opens);
  size_t scan_bytes = s.scan_bytes;
  cudaError_t err =
      cub::DeviceScan::ExclusiveSum(s.temp, scan_bytes, s.opens, s.opened_before, num_rows + 1, stream);
  if (err != cudaSuccess) return err;
  if (num_rows > 0) {
    AssignIdsKernel<<<point_blocks, kThreads, 0, stream>>>(s.first_of, s.opened_before, num_rows, max_voxels, ids,
                                                           s.sort_keys, s.sort_points);
    size_t sort_bytes = s.sort_bytes;
    err = cub::DeviceRadixSort::SortPairs(s.temp, sort_bytes, s.sort_keys, s.sorted_keys, s.sort_points,
                                          s.sorted_points, num_rows, 0, KeyBits(max_voxels), stream);
    if (err != cudaSuccess) return err;
    FindRunsKernel<<<point_blocks, kThreads, 0, stream>>>(s.sorted_keys, num_rows, max_voxels, s.run_start,
                                                          s.run_end);
  }
  WriteRowsKernel<<<BlocksFor(max_voxels * features), kThreads, 0, stream>>>(
      points, features, g, s.sorted_points, s.run_start, s.run_end, s.opened_before + num_rows, max_voxels,
      max_points, mean, voxels, coords, counts, num_voxels);
  return cudaSuccess;
}

ffi::Error Voxelize(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer points,
                    ffi::AnyBuffer num_points, ffi::AnyBuffer reused, ffi::Span<const float> vsize,
                    ffi::Span<const float> low, ffi::Span<const int64_t> grid, int64_t empty_mean,
                    ffi::Result<ffi::AnyBuffer> voxels_out, ffi::Result<ffi::AnyBuffer> coords_out,
                    ffi::Result<ffi::AnyBuffer> counts_out, ffi::Result<ffi::AnyBuffer> ids_out,
                    ffi::Result<ffi::AnyBuffer> num_voxels_out) {
  const std::string op = "jsparse_voxelize: ";
  VoxelGeometry g{};
  const std::string message = ValidateVoxelize(op, points, num_points, reused, vsize, low, grid, *voxels_out,
                                               *coords_out, *counts_out, *ids_out, *num_voxels_out, &g);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);

  const int64_t num_rows = points.dimensions()[0];
  const int64_t features = points.dimensions()[1];
  const int64_t max_voxels = voxels_out->dimensions()[0];
  const int64_t max_points = voxels_out->dimensions()[1];
  // The table holds at most min(points, cells) distinct keys (num_points stays on the device).
  const int64_t table_slots = TableSlots(static_cast<int64_t>(std::min<uint64_t>(num_rows, g.cells)));

  VoxelizeScratch s{};
  int64_t bytes = 0;
  bool allocated = true;
  auto take = [&](auto*& array, int64_t count) {
    using T = std::remove_reference_t<decltype(*array)>;
    array = AllocateScratch<T>(scratch, count);
    bytes += std::max<int64_t>(count, 1) * static_cast<int64_t>(sizeof(T));
    allocated &= array != nullptr;
  };
  take(s.table_keys, table_slots);
  take(s.table_first, table_slots);
  take(s.slot_of, num_rows);
  take(s.first_of, num_rows);
  take(s.opens, num_rows + 1);
  take(s.opened_before, num_rows + 1);
  take(s.sort_keys, num_rows);
  take(s.sorted_keys, num_rows);
  take(s.sort_points, num_rows);
  take(s.sorted_points, num_rows);
  take(s.run_start, max_voxels);
  take(s.run_end, max_voxels);
  if (!allocated) return ScratchError(op, bytes);
  // Temporary storage sizes: host-side queries, nothing runs.
  cudaError_t err =
      cub::DeviceScan::ExclusiveSum(nullptr, s.scan_bytes, s.opens, s.opened_before, num_rows + 1, stream);
  if (err == cudaSuccess && num_rows > 0) {
    err = cub::DeviceRadixSort::SortPairs(nullptr, s.sort_bytes, s.sort_keys, s.sorted_keys, s.sort_points,
                                          s.sorted_points, num_rows, 0, KeyBits(max_voxels), stream);
  }
  if (err != cudaSuccess) return CubError(op, err);
  const auto temp_bytes = static_cast<int64_t>(std::max(s.scan_bytes, s.sort_bytes));
  s.temp = AllocateScratch<std::byte>(scratch, temp_bytes);
  if (s.temp == nullptr) return ScratchError(op, temp_bytes);

  err = ComputeVoxelize(
      stream, g, points.typed_data<float>(), num_points.typed_data<int32_t>(), num_rows, features, max_voxels,
      max_points, empty_mean != 0, table_slots, s, voxels_out->typed_data<float>(),
      coords_out->typed_data<int32_t>(), counts_out->typed_data<int32_t>(), ids_out->typed_data<int32_t>(),
      num_voxels_out->typed_data<int32_t>());
  if (err != cudaSuccess) return CubError(op, err);
  return LaunchError(op);
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseVoxelizeCuda, jsparse::Voxelize,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()     // XLA's stream
        .Ctx<ffi::ScratchAllocator>()                 // the hash table, per-point arrays, cub's storage
        JSPARSE_VOXELIZE_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_voxelize", JsparseVoxelizeCuda);
