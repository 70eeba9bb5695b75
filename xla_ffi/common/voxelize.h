// The voxelizer's point -> cell arithmetic (jsparse_voxelize), shared by the CPU and CUDA
// handlers so that both compute bitwise the same cells, keys and coords: IEEE float32 subtraction
// and division (spconv's formula), then truncation.
#pragma once

#include <cstdint>

#include "device.h"

namespace jsparse {

constexpr int kMaxVoxelNdim = 4;
constexpr uint64_t kEmptyKey = ~0ull;  // cell keys stay below 2**62: this one marks "no cell"

// The static geometry, in the handler's axis order (xyz, as the attributes give it).
struct VoxelGeometry {
  int ndim;
  float vsize[kMaxVoxelNdim];
  float low[kMaxVoxelNdim];
  int64_t grid[kMaxVoxelNdim];
  uint64_t stride[kMaxVoxelNdim];  // key = sum(cell[a] * stride[a]): x fastest, as zyx row-major
  uint64_t cells;                  // prod(grid)
};

// (value - low) / vsize, each step rounded to nearest float32 (on the device too, whatever the
// compiler's fast-math and contraction settings).
JSPARSE_HD inline float CellQuotient(float value, float low, float vsize) {
#ifdef __CUDA_ARCH__
  return __fdiv_rn(__fsub_rn(value, low), vsize);
#else
  return (value - low) / vsize;
#endif
}

// The cell of `value` on axis `a`: floor((value - low) / vsize) in float32 arithmetic, spconv's.
// Out-of-range, NaN and infinite quotients give 0 (the integer conversion would be undefined for
// them) and clear *inside; so does a cell past the grid.
JSPARSE_HD inline int32_t AxisCell(const VoxelGeometry& g, int a, float value, bool* inside) {
  const float q = CellQuotient(value, g.low[a], g.vsize[a]);
  const bool finite = (q >= 0.0f) & (q < 2147483648.0f);  // false for NaN
  const int32_t c = static_cast<int32_t>(finite ? q : 0.0f);  // q >= 0: truncation is floor
  *inside &= finite & (c < g.grid[a]);
  return c;
}

// The packed cell key of the point whose coordinates start at `point` (ndim of them); clears
// *inside when the point has no cell, and the key is then meaningless.
JSPARSE_HD inline uint64_t CellKey(const VoxelGeometry& g, int ndim, const float* point, bool* inside) {
  uint64_t key = 0;
  for (int a = 0; a < ndim; ++a) key += static_cast<uint64_t>(AxisCell(g, a, point[a], inside)) * g.stride[a];
  return key;
}

// The cell of a point inside the grid, in zyx order: coords[0 .. g.ndim).
JSPARSE_HD inline void CellZyx(const VoxelGeometry& g, const float* point, int32_t* coords) {
  bool inside = true;
  for (int a = 0; a < g.ndim; ++a) coords[g.ndim - 1 - a] = AxisCell(g, a, point[a], &inside);
}

}  // namespace jsparse
