// Sparse pooling on CUDA over a kernel map: the targets of xla_ffi/cpu/pool.cc, with the same
// operands, semantics and bitwise results (see that file for the formulas).
//
// Every kernel is output-stationary: one thread owns one (row, channel) of the output, visits the
// taps in kernel order with a float32 accumulator and writes its element once, so there are no
// atomics and results do not depend on the launch shape. Threads are numbered row-major over
// [rows, C], so consecutive threads take consecutive channels of the same row and their loads of
// a gathered row and their stores are coalesced.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/pool_args.h"
#include "../common/registry.h"
#include "cuda_util.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

// ---- jsparse_pool_max ----

// out[o, c] = max over the taps k with a valid input of x[nbr[o, k], c]; arg[o, c] = the first
// such k holding the maximum (strictly greater replaces), or -1 and out = 0 when there is none.
template <typename T>
__global__ void PoolMaxKernel(const T* __restrict__ x, int64_t n_in, int64_t channels,
                              const int32_t* __restrict__ nbr, int64_t n_out, int64_t taps,
                              T* __restrict__ out, int32_t* __restrict__ arg) {
  JSPARSE_GRID_LOOP(e, n_out * channels) {
    const int64_t o = e / channels;
    const int64_t c = e - o * channels;
    const int32_t* taps_of_o = nbr + o * taps;
    float best = 0.0f;
    int32_t best_tap = -1;
    for (int64_t k = 0; k < taps; ++k) {
      const int32_t i = taps_of_o[k];
      if (i < 0 || i >= n_in) continue;
      const float v = ToFloat(x[i * channels + c]);
      if (best_tap < 0 || v > best) {  // strictly greater: the first maximum wins
        best = v;
        best_tap = static_cast<int32_t>(k);
      }
    }
    out[e] = FromFloat<T>(best_tap < 0 ? 0.0f : best);
    arg[e] = best_tap;
  }
}

template <typename T>
void ComputePoolMax(cudaStream_t stream, const T* x, int64_t n_in, int64_t channels, const int32_t* nbr,
                    int64_t n_out, int64_t taps, T* out, int32_t* arg) {
  const int64_t n = n_out * channels;
  if (n == 0) return;
  PoolMaxKernel<T><<<BlocksFor(n), kThreads, 0, stream>>>(x, n_in, channels, nbr, n_out, taps, out, arg);
}

ffi::Error PoolMaxImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer nbr,
                       ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> arg) {
  PoolDims d{};
  const std::string message = ValidatePoolMax(x, nbr, *out, *arg, &d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchFeatureType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    ComputePoolMax(stream, static_cast<const T*>(x.untyped_data()), d.n_src, d.channels,
                   nbr.typed_data<int32_t>(), d.n_dst, d.taps, static_cast<T*>(out->untyped_data()),
                   arg->typed_data<int32_t>());
  });
  return LaunchError("jsparse_pool_max: ");
}

// ---- jsparse_pool_max_grad ----

// dx[i, c] = sum over the taps k, in order, of dy[o, c] where o = nbr_t[i, k] is a valid output
// row and arg[o, c] == k.
template <typename T>
__global__ void PoolMaxGradKernel(const T* __restrict__ dy, const int32_t* __restrict__ arg, int64_t n_out,
                                  int64_t channels, const int32_t* __restrict__ nbr_t, int64_t n_in,
                                  int64_t taps, T* __restrict__ dx) {
  JSPARSE_GRID_LOOP(e, n_in * channels) {
    const int64_t i = e / channels;
    const int64_t c = e - i * channels;
    const int32_t* taps_of_i = nbr_t + i * taps;
    float acc = 0.0f;
    for (int64_t k = 0; k < taps; ++k) {
      const int32_t o = taps_of_i[k];
      if (o < 0 || o >= n_out) continue;
      if (arg[o * channels + c] == k) acc += ToFloat(dy[o * channels + c]);
    }
    dx[e] = FromFloat<T>(acc);
  }
}

template <typename T>
void ComputePoolMaxGrad(cudaStream_t stream, const T* dy, const int32_t* arg, int64_t n_out, int64_t channels,
                        const int32_t* nbr_t, int64_t n_in, int64_t taps, T* dx) {
  const int64_t n = n_in * channels;
  if (n == 0) return;
  PoolMaxGradKernel<T><<<BlocksFor(n), kThreads, 0, stream>>>(dy, arg, n_out, channels, nbr_t, n_in, taps, dx);
}

ffi::Error PoolMaxGradImpl(cudaStream_t stream, ffi::AnyBuffer dy, ffi::AnyBuffer arg, ffi::AnyBuffer nbr_t,
                           ffi::Result<ffi::AnyBuffer> dx) {
  PoolDims d{};
  const std::string message = ValidatePoolMaxGrad(dy, arg, nbr_t, *dx, &d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchFeatureType(dy.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    ComputePoolMaxGrad(stream, static_cast<const T*>(dy.untyped_data()), arg.typed_data<int32_t>(), d.n_src,
                       d.channels, nbr_t.typed_data<int32_t>(), d.n_dst, d.taps,
                       static_cast<T*>(dx->untyped_data()));
  });
  return LaunchError("jsparse_pool_max_grad: ");
}

// ---- jsparse_pool_avg and jsparse_pool_avg_grad ----

// out[r, c] = sum over the taps k, in order, of src[map[r, k], c] for the valid source rows,
// times the float32 reciprocal 1 / max(counts[r], 1) when counts is given (as on CPU, so that
// no product is fused into the sum and the rounding matches the reference path).
template <typename TIn, typename TOut>
__global__ void GatherSumKernel(const TIn* __restrict__ src, int64_t n_src, int64_t channels,
                                const int32_t* __restrict__ map, int64_t n_dst, int64_t taps,
                                const int32_t* __restrict__ counts, TOut* __restrict__ out) {
  JSPARSE_GRID_LOOP(e, n_dst * channels) {
    const int64_t r = e / channels;
    const int64_t c = e - r * channels;
    const int32_t* taps_of_r = map + r * taps;
    float acc = 0.0f;
    for (int64_t k = 0; k < taps; ++k) {
      const int32_t s = taps_of_r[k];
      if (s < 0 || s >= n_src) continue;
      acc += ToFloat(src[s * channels + c]);
    }
    if (counts != nullptr) {
      const float scale = 1.0f / static_cast<float>(max(counts[r], 1));
      acc *= scale;
    }
    out[e] = FromFloat<TOut>(acc);
  }
}

template <typename TIn, typename TOut>
void ComputeGatherSum(cudaStream_t stream, const TIn* src, int64_t n_src, int64_t channels, const int32_t* map,
                      int64_t n_dst, int64_t taps, const int32_t* counts, TOut* out) {
  const int64_t n = n_dst * channels;
  if (n == 0) return;
  GatherSumKernel<TIn, TOut><<<BlocksFor(n), kThreads, 0, stream>>>(src, n_src, channels, map, n_dst, taps,
                                                                    counts, out);
}

ffi::Error PoolAvgImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer nbr, ffi::AnyBuffer counts,
                       ffi::Result<ffi::AnyBuffer> out) {
  PoolDims d{};
  const std::string message = ValidatePoolAvg(x, nbr, counts, *out, &d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchFeatureType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    ComputeGatherSum(stream, static_cast<const T*>(x.untyped_data()), d.n_src, d.channels,
                     nbr.typed_data<int32_t>(), d.n_dst, d.taps, counts.typed_data<int32_t>(),
                     static_cast<T*>(out->untyped_data()));
  });
  return LaunchError("jsparse_pool_avg: ");
}

ffi::Error PoolAvgGradImpl(cudaStream_t stream, ffi::AnyBuffer scaled_dy, ffi::AnyBuffer nbr_t,
                           ffi::Result<ffi::AnyBuffer> dx) {
  PoolDims d{};
  const std::string message = ValidatePoolAvgGrad(scaled_dy, nbr_t, *dx, &d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchFeatureType(dx->element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    ComputeGatherSum(stream, scaled_dy.typed_data<float>(), d.n_src, d.channels, nbr_t.typed_data<int32_t>(),
                     d.n_dst, d.taps, static_cast<const int32_t*>(nullptr), static_cast<T*>(dx->untyped_data()));
  });
  return LaunchError("jsparse_pool_avg_grad: ");
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolMaxCuda, jsparse::PoolMaxImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_POOL_MAX_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolMaxGradCuda, jsparse::PoolMaxGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_POOL_MAX_GRAD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolAvgCuda, jsparse::PoolAvgImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_POOL_AVG_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolAvgGradCuda, jsparse::PoolAvgGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_POOL_AVG_GRAD_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_max", JsparsePoolMaxCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_max_grad", JsparsePoolMaxGradCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_avg", JsparsePoolAvgCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_avg_grad", JsparsePoolAvgGradCuda);
