// Argument checks of jsparse_voxelize, shared by the CPU and CUDA handlers: the same message for
// the same mistake on every device. Host code only.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "args.h"
#include "voxelize.h"
#include "xla/ffi/api/ffi.h"

// The operands, attributes and results of jsparse_voxelize, bound after the device's contexts
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_VOXELIZE_SIGNATURE`): both devices bind the same ones in the
// same order, so a call built in Python fits either.
#define JSPARSE_VOXELIZE_SIGNATURE                                                                                   \
  .Arg<ffi::AnyBuffer>()                           /* points [P, F] float32, x, y[, z[, t]] first */                 \
      .Arg<ffi::AnyBuffer>()                       /* num_points [] int32 on the device: rows past it are padding */ \
      .Arg<ffi::AnyBuffer>()                       /* reused voxels, never read: an empty array, or old */           \
                                                   /* voxels the caller donated, aliased to the result */            \
      .Attr<ffi::Span<const float>>("voxel_size")  /* [ndim] float32, xyz order */                                   \
      .Attr<ffi::Span<const float>>("range_min")   /* [ndim] float32, xyz order */                                   \
      .Attr<ffi::Span<const int64_t>>("grid_size") /* [ndim], xyz order */                                           \
      .Attr<int64_t>("empty_mean")                 /* 1: empty slots hold the voxel's mean */                        \
      .Ret<ffi::AnyBuffer>()                       /* voxels [V, M, F] float32 */                                    \
      .Ret<ffi::AnyBuffer>()                       /* coords [V, ndim] int32, zyx; padding rows -1 */                \
      .Ret<ffi::AnyBuffer>()                       /* num_points_per_voxel [V] int32; padding rows 0 */              \
      .Ret<ffi::AnyBuffer>()                       /* pc_voxel_id [P] int32, -1 when not voxelized */                \
      .Ret<ffi::AnyBuffer>()                       /* num_voxels [] int32, may exceed V */

namespace jsparse {

// Checks the geometry attributes and fills `g`; returns an error message or an empty string.
inline std::string MakeVoxelGeometry(const std::string& op, ffi::Span<const float> vsize, ffi::Span<const float> low,
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

// Every check of a jsparse_voxelize call: the attributes (filling `g`), then the operands and
// results. Returns an error message or an empty string.
inline std::string ValidateVoxelize(const std::string& op, const ffi::AnyBuffer& points,
                                    const ffi::AnyBuffer& num_points, const ffi::AnyBuffer& reused,
                                    ffi::Span<const float> vsize, ffi::Span<const float> low,
                                    ffi::Span<const int64_t> grid, const ffi::AnyBuffer& voxels,
                                    const ffi::AnyBuffer& coords, const ffi::AnyBuffer& counts,
                                    const ffi::AnyBuffer& ids, const ffi::AnyBuffer& num_voxels, VoxelGeometry* g) {
  std::string message = MakeVoxelGeometry(op, vsize, low, grid, g);
  if (!message.empty()) return message;
  const auto pd = points.dimensions();
  const auto vd = voxels.dimensions();
  const auto cd = coords.dimensions();
  const auto id = ids.dimensions();
  if (points.element_type() != ffi::F32 || pd.size() != 2 || pd[1] < g->ndim) {
    return op + "points must be float32 [P, F] with F >= " + std::to_string(g->ndim) +
           " (coordinates first), got shape " + Shape(pd);
  }
  if (pd[0] > INT32_MAX) return op + "more points than int32 ids reach";
  if (num_points.element_type() != ffi::S32 || num_points.dimensions().size() != 0) {
    return op + "num_points must be an int32 scalar";
  }
  if (voxels.element_type() != ffi::F32 || vd.size() != 3 || vd[0] < 1 || vd[1] < 1 || vd[2] != pd[1] ||
      vd[0] > INT32_MAX / vd[1]) {
    return op + "voxels must be float32 [max_num_voxels, max_points_per_voxel, F] with both sizes >= 1, " +
           "F the points' columns and max_num_voxels * max_points_per_voxel < 2**31; got " + Shape(vd) +
           " for points " + Shape(pd);
  }
  if (coords.element_type() != ffi::S32 || cd.size() != 2 || cd[0] != vd[0] || cd[1] != g->ndim ||
      counts.element_type() != ffi::S32 || counts.dimensions().size() != 1 || counts.dimensions()[0] != vd[0] ||
      ids.element_type() != ffi::S32 || id.size() != 1 || id[0] != pd[0] || num_voxels.element_type() != ffi::S32 ||
      num_voxels.dimensions().size() != 0) {
    return op + "outputs must be int32 coords [V, ndim], num_points_per_voxel [V], pc_voxel_id [P] and " +
           "num_voxels [] beside voxels [V, M, F]; got coords " + Shape(cd) + " and pc_voxel_id " + Shape(id) +
           " for voxels " + Shape(vd) + " and points " + Shape(pd);
  }
  if (reused.element_count() != 0 && reused.untyped_data() != voxels.untyped_data()) {
    return op + "the reused voxels must be an empty array or aliased to the voxels result";
  }
  return {};
}

}  // namespace jsparse
