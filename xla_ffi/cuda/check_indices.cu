// jsparse_check_indices on CUDA: one thread per row (see common/check_indices.h).
#include <cuda_runtime.h>

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

// spatial_shape passed by value as a kernel argument, so no device allocation or copy is needed.
struct SpatialShape {
  int64_t dims[kMaxNdim];
};

__global__ void CheckIndicesKernel(const int32_t* __restrict__ indices, int64_t n, int ndim,
                                   SpatialShape shape, int64_t batch_size,
                                   int32_t* __restrict__ status) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  status[i] = ClassifyIndexRow(indices + i * (1 + ndim), ndim, shape.dims, batch_size);
}

// Launches CheckIndicesKernel on `stream`; status[i] = ClassifyIndexRow(indices[i, :]).
cudaError_t ComputeCheckIndices(cudaStream_t stream, const int32_t* indices, int64_t n, int ndim,
                                const SpatialShape& shape, int64_t batch_size, int32_t* status) {
  if (n == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  CheckIndicesKernel<<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(
      indices, n, ndim, shape, batch_size, status);
  return cudaGetLastError();
}

ffi::Error CheckIndicesImpl(cudaStream_t stream, IndicesBuffer indices,
                            ffi::Span<const int64_t> spatial_shape, int64_t batch_size,
                            StatusBuffer status) {
  int64_t n = 0;
  const std::string message = ValidateCheckIndices(indices, spatial_shape, batch_size, status->dimensions(), &n);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const int64_t ndim = static_cast<int64_t>(spatial_shape.size());
  SpatialShape shape{};
  for (int64_t j = 0; j < ndim; ++j) shape.dims[j] = spatial_shape[j];
  cudaError_t err = ComputeCheckIndices(stream, indices.typed_data<int32_t>(), n, static_cast<int>(ndim),
                                        shape, batch_size, status->typed_data());
  if (err != cudaSuccess) {
    return ffi::Error::Internal(std::string("jsparse_check_indices: CUDA launch failed: ") +
                                cudaGetErrorString(err));
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseCheckIndicesCuda, jsparse::CheckIndicesImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()         // stream
        JSPARSE_CHECK_INDICES_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_check_indices", JsparseCheckIndicesCuda);
