// Row classification for jsparse_check_indices, shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>
#include <string>

#include "device.h"
#include "xla/ffi/api/ffi.h"

// The operand, attributes and result of jsparse_check_indices, bound after the device's context
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_CHECK_INDICES_SIGNATURE`): both devices bind the same ones in
// the same order, so a call built in Python fits either.
#define JSPARSE_CHECK_INDICES_SIGNATURE                                                  \
  .Arg<ffi::AnyBuffer>()                               /* indices [N, 1 + ndim] int32 */ \
      .Attr<ffi::Span<const int64_t>>("spatial_shape") /* int64 array, ndim entries */   \
      .Attr<int64_t>("batch_size")                     /* int64 scalar */                \
      .Ret<ffi::Buffer<ffi::S32>>()                    /* status [N] int32 */

namespace jsparse {

// Largest number of spatial dimensions any kernel accepts.
inline constexpr int kMaxNdim = 8;

// Status codes written per row; the Python side mirrors these values.
enum IndexStatus : int32_t {
  kIndexValid = 0,          // active row, batch and all coordinates in range
  kIndexPadding = 1,        // batch index == -1, coordinates not checked
  kIndexBadBatch = 2,       // batch < -1 or batch >= batch_size
  kIndexBadCoordinate = 3,  // batch valid, some coordinate outside [0, shape)
};

// Classifies one row of indices: row[0] is the batch index, row[1..ndim] the coordinates.
JSPARSE_HD inline int32_t ClassifyIndexRow(const int32_t* row, int ndim,
                                           const int64_t* spatial_shape,
                                           int64_t batch_size) {
  const int64_t batch = row[0];
  if (batch == -1) return kIndexPadding;
  if (batch < -1 || batch >= batch_size) return kIndexBadBatch;
  for (int j = 0; j < ndim; ++j) {
    const int64_t c = row[1 + j];
    if (c < 0 || c >= spatial_shape[j]) return kIndexBadCoordinate;
  }
  return kIndexValid;
}

// Checks the shapes and attributes of a jsparse_check_indices call on the host. indices is
// [..., N, 1 + ndim] (leading dims come from vmap with vmap_method="broadcast_all" and are treated
// as more rows); status must be indices.shape[:-1]. Returns an empty string when everything is
// valid, otherwise a message for ffi::Error::InvalidArgument.
inline std::string ValidateCheckIndicesArgs(bool indices_int32, const int64_t* indices_dims,
                                            int64_t indices_rank,
                                            const int64_t* status_dims, int64_t status_rank,
                                            const int64_t* spatial_shape, int64_t ndim,
                                            int64_t batch_size) {
  const std::string op = "jsparse_check_indices: ";
  if (!indices_int32) return op + "indices must be int32; cast with indices.astype(jnp.int32)";
  if (indices_rank < 2) {
    return op + "indices must be an int32 array [N, 1 + ndim] (batch index, then coordinates), " +
           "got rank " + std::to_string(indices_rank);
  }
  if (ndim < 1 || ndim > kMaxNdim) {
    return op + "spatial_shape must have 1 to " + std::to_string(kMaxNdim) +
           " entries, got " + std::to_string(ndim);
  }
  for (int64_t j = 0; j < ndim; ++j) {
    if (spatial_shape[j] <= 0) {
      return op + "spatial_shape[" + std::to_string(j) + "] must be positive, got " +
             std::to_string(spatial_shape[j]);
    }
  }
  if (batch_size <= 0) {
    return op + "batch_size must be positive, got " + std::to_string(batch_size);
  }
  const int64_t cols = indices_dims[indices_rank - 1];
  if (cols != 1 + ndim) {
    return op + "indices has " + std::to_string(cols) + " columns but spatial_shape has " +
           std::to_string(ndim) + " entries; expected 1 + " + std::to_string(ndim) + " = " +
           std::to_string(1 + ndim) + " columns (batch index, then one coordinate per spatial " +
           "dimension)";
  }
  bool status_ok = status_rank == indices_rank - 1;
  for (int64_t d = 0; status_ok && d < status_rank; ++d) {
    status_ok = status_dims[d] == indices_dims[d];
  }
  if (!status_ok) {
    return op + "the status output must have shape indices.shape[:-1] (one int32 per row)";
  }
  return {};
}

// Number of rows in indices [..., N, 1 + ndim] (all leading dims together).
inline int64_t IndexRowCount(const int64_t* indices_dims, int64_t indices_rank) {
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < indices_rank; ++d) rows *= indices_dims[d];
  return rows;
}

// ValidateCheckIndicesArgs on a call's FFI operands (status_dims: the status output's shape); when
// they are valid, also sets *rows to the number of index rows.
inline std::string ValidateCheckIndices(const xla::ffi::AnyBuffer& indices,
                                        xla::ffi::Span<const int64_t> spatial_shape, int64_t batch_size,
                                        xla::ffi::Span<const int64_t> status_dims, int64_t* rows) {
  const auto dims = indices.dimensions();
  std::string message = ValidateCheckIndicesArgs(
      indices.element_type() == xla::ffi::S32, dims.begin(), dims.size(), status_dims.begin(),
      status_dims.size(), spatial_shape.begin(), static_cast<int64_t>(spatial_shape.size()), batch_size);
  if (message.empty()) *rows = IndexRowCount(dims.begin(), dims.size());
  return message;
}

}  // namespace jsparse
