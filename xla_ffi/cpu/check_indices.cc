// jsparse_check_indices on CPU: classify each row of an indices array (see common/check_indices.h).
#include <cstdint>
#include <string>

#include "../common/check_indices.h"
#include "../common/registry.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

// int32 [N, 1 + ndim], or [..., N, 1 + ndim] under vmap. Decoded as AnyBuffer so that a wrong
// dtype or rank gets our message instead of the decoder's "failed to decode operands".
using IndicesBuffer = ffi::AnyBuffer;
using StatusBuffer = ffi::ResultBuffer<ffi::S32>;

// status[i] = ClassifyIndexRow(indices[i, :]) for i in [0, n).
void ComputeCheckIndices(const int32_t* indices, int64_t n, int ndim,
                         const int64_t* spatial_shape, int64_t batch_size, int32_t* status) {
  const int64_t cols = 1 + ndim;
  for (int64_t i = 0; i < n; ++i) {
    status[i] = ClassifyIndexRow(indices + i * cols, ndim, spatial_shape, batch_size);
  }
}

ffi::Error CheckIndicesImpl(IndicesBuffer indices, ffi::Span<const int64_t> spatial_shape,
                            int64_t batch_size, StatusBuffer status) {
  int64_t n = 0;
  const std::string message = ValidateCheckIndices(indices, spatial_shape, batch_size, status->dimensions(), &n);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  ComputeCheckIndices(indices.typed_data<int32_t>(), n, static_cast<int>(spatial_shape.size()),
                      spatial_shape.begin(), batch_size, status->typed_data());
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseCheckIndicesCpu, jsparse::CheckIndicesImpl,
    ffi::Ffi::Bind() JSPARSE_CHECK_INDICES_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_check_indices", JsparseCheckIndicesCpu);
