// Sparse convolution on CUDA: the targets of xla_ffi/cpu/conv.cc, same semantics (see there and
// jsparse/ops/_conv.py), float32 accumulation in full precision (no TF32), any feature dtype.
//
// jsparse_conv_gather_gemm: out[o] = sum_k features[nbr[o, k]] @ kernel[k] (per group). A block
//   owns a tile of kTileRows output rows x BN output channels of one group and walks the taps in
//   order, skipping a tap no row of the tile uses; per tap it stages the gathered feature rows and
//   the tap's weights in shared memory, kTileK input channels at a time. Each output element is
//   summed by one thread in a fixed order: no atomics, the same bits on every run.
// jsparse_conv_weight_grad: d_kernel[k] = sum_o features[nbr[o, k]]^T d_out[o] (per group). A
//   block owns a BA x BN tile of one tap's weights and one chunk of output rows, and writes its
//   float32 partial sums; a second kernel adds the chunks in chunk order. The chunks depend on the
//   shapes only, so the sums' order is fixed.
// jsparse_conv_backward_symmetric: both gradients over an odd submanifold map, the input gradient
//   being the gather-GEMM of d_out through the reversed taps.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/conv_args.h"
#include "../common/registry.h"
#include "cuda_util.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int kGemmThreads = 256;  // 16 x 16: ty picks rows, tx picks output channels
constexpr int kTileRows = 64;      // output rows per gather-GEMM block
constexpr int kTileK = 16;         // reduction depth staged per step
constexpr int64_t kMaxChunks = 32; // weight gradient: row chunks summed in a fixed order

// Output-channel tile: 16 for narrow groups, else 64.
int TileWidth(int64_t channels) { return channels <= 16 ? 16 : 64; }

template <typename T, int BN>
__global__ void __launch_bounds__(kGemmThreads)
    GatherGemmKernel(const T* __restrict__ x, const T* __restrict__ w, const int32_t* __restrict__ nbr, ConvDims d,
                     bool reverse_taps, T* __restrict__ out) {
  constexpr int TM = kTileRows / 16, TN = BN / 16;
  __shared__ float xs[kTileK][kTileRows];  // gathered rows, transposed
  __shared__ float ws[kTileK][BN];
  __shared__ int32_t rows[kTileRows];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTileRows;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t group = blockIdx.z;
  const int64_t c_in = d.c_in(), c_out = d.c_out();
  const T* x_group = x + group * d.a;
  float acc[TM][TN] = {};
  for (int64_t k = 0; k < d.taps; ++k) {
    int used = 0;
    if (tid < kTileRows) {
      const int64_t m = m0 + tid;
      const int32_t r = m < d.n_out ? nbr[m * d.taps + (reverse_taps ? d.taps - 1 - k : k)] : -1;
      rows[tid] = r;
      used = r >= 0;
    }
    if (!__syncthreads_or(used)) continue;  // also publishes rows[]
    const T* w_tap = w + k * d.a * c_out + group * d.b;
    for (int64_t c0 = 0; c0 < d.a; c0 += kTileK) {
      for (int e = tid; e < kTileRows * kTileK; e += kGemmThreads) {
        const int m = e / kTileK, kk = e % kTileK;
        const int32_t r = rows[m];
        const int64_t c = c0 + kk;
        xs[kk][m] = r >= 0 && c < d.a ? ToFloat(x_group[int64_t{r} * c_in + c]) : 0.0f;
      }
      for (int e = tid; e < kTileK * BN; e += kGemmThreads) {
        const int kk = e / BN, nn = e % BN;
        const int64_t c = c0 + kk, col = n0 + nn;
        ws[kk][nn] = c < d.a && col < d.b ? ToFloat(w_tap[c * c_out + col]) : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        float xv[TM], wv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) xv[i] = xs[kk][ty * TM + i];
#pragma unroll
        for (int j = 0; j < TN; ++j) wv[j] = ws[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i) {
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(xv[i], wv[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < TM; ++i) {
    const int64_t m = m0 + ty * TM + i;
    if (m >= d.n_out) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = n0 + tx + 16 * j;
      if (col < d.b) out[m * c_out + group * d.b + col] = FromFloat<T>(acc[i][j]);
    }
  }
}

// out[o] = sum_k x[nbr[o, k']] @ w[k] with k' = K - 1 - k when reverse_taps; dims of this product.
template <typename T>
void LaunchGatherGemm(cudaStream_t stream, const T* x, const T* w, const int32_t* nbr, const ConvDims& d,
                      bool reverse_taps, T* out) {
  if (d.n_out == 0 || d.b == 0) return;
  const int bn = TileWidth(d.b);
  const dim3 grid(static_cast<unsigned int>((d.n_out + kTileRows - 1) / kTileRows),
                  static_cast<unsigned int>((d.b + bn - 1) / bn), static_cast<unsigned int>(d.groups));
  if (bn == 16) {
    GatherGemmKernel<T, 16><<<grid, kGemmThreads, 0, stream>>>(x, w, nbr, d, reverse_taps, out);
  } else {
    GatherGemmKernel<T, 64><<<grid, kGemmThreads, 0, stream>>>(x, w, nbr, d, reverse_taps, out);
  }
}

// partials[chunk][k][c][g * b + j] = sum over the chunk's rows o of x[nbr[o, k], g * a + c] * dy[o, g * b + j].
// Grid: x = (a tiles) x (b tiles), y = taps x groups, z = chunks.
template <typename T, int BA, int BN>
__global__ void __launch_bounds__(kGemmThreads)
    WeightGradKernel(const T* __restrict__ x, const T* __restrict__ dy, const int32_t* __restrict__ nbr, ConvDims d,
                     int64_t chunk_rows, float* __restrict__ partials) {
  constexpr int TA = BA / 16, TN = BN / 16;
  __shared__ float xs[kTileK][BA];
  __shared__ float ys[kTileK][BN];
  __shared__ int32_t rows[kTileK];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t b_tiles = (d.b + BN - 1) / BN;
  const int64_t a0 = static_cast<int64_t>(blockIdx.x / b_tiles) * BA;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x % b_tiles) * BN;
  const int64_t k = blockIdx.y / d.groups;
  const int64_t group = blockIdx.y % d.groups;
  const int64_t c_in = d.c_in(), c_out = d.c_out();
  const int64_t first = static_cast<int64_t>(blockIdx.z) * chunk_rows;
  const int64_t last = first + chunk_rows < d.n_out ? first + chunk_rows : d.n_out;
  float acc[TA][TN] = {};
  for (int64_t o0 = first; o0 < last; o0 += kTileK) {
    int used = 0;
    if (tid < kTileK) {
      const int64_t o = o0 + tid;
      const int32_t r = o < last ? nbr[o * d.taps + k] : -1;
      rows[tid] = r;
      used = r >= 0;
    }
    if (!__syncthreads_or(used)) continue;
    for (int e = tid; e < kTileK * BA; e += kGemmThreads) {
      const int kk = e / BA, c = e % BA;
      const int32_t r = rows[kk];
      xs[kk][c] = r >= 0 && a0 + c < d.a ? ToFloat(x[int64_t{r} * c_in + group * d.a + a0 + c]) : 0.0f;
    }
    for (int e = tid; e < kTileK * BN; e += kGemmThreads) {
      const int kk = e / BN, j = e % BN;
      const bool live = rows[kk] >= 0 && b0 + j < d.b;  // rows without a pair add nothing
      ys[kk][j] = live ? ToFloat(dy[(o0 + kk) * c_out + group * d.b + b0 + j]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTileK; ++kk) {
      float xv[TA], yv[TN];
#pragma unroll
      for (int i = 0; i < TA; ++i) xv[i] = xs[kk][ty * TA + i];
#pragma unroll
      for (int j = 0; j < TN; ++j) yv[j] = ys[kk][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < TA; ++i) {
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(xv[i], yv[j], acc[i][j]);
      }
    }
    __syncthreads();
  }
  float* tile = partials + (static_cast<int64_t>(blockIdx.z) * d.taps + k) * d.a * c_out;
#pragma unroll
  for (int i = 0; i < TA; ++i) {
    const int64_t c = a0 + ty * TA + i;
    if (c >= d.a) continue;
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t col = b0 + tx + 16 * j;
      if (col < d.b) tile[c * c_out + group * d.b + col] = acc[i][j];
    }
  }
}

// d_kernel[e] = sum over chunks, in order, of partials[chunk][e].
template <typename T>
__global__ void SumChunksKernel(const float* __restrict__ partials, int64_t chunks, int64_t size,
                                T* __restrict__ d_kernel) {
  JSPARSE_GRID_LOOP(e, size) {
    float sum = 0.0f;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partials[chunk * size + e];
    d_kernel[e] = FromFloat<T>(sum);
  }
}

template <typename T, int BA>
void LaunchWeightGradTiles(cudaStream_t stream, const T* x, const T* dy, const int32_t* nbr, const ConvDims& d,
                           int64_t chunk_rows, int64_t chunks, float* partials) {
  const int bn = TileWidth(d.b);
  const dim3 grid(static_cast<unsigned int>(((d.a + BA - 1) / BA) * ((d.b + bn - 1) / bn)),
                  static_cast<unsigned int>(d.taps * d.groups), static_cast<unsigned int>(chunks));
  if (bn == 16) {
    WeightGradKernel<T, BA, 16><<<grid, kGemmThreads, 0, stream>>>(x, dy, nbr, d, chunk_rows, partials);
  } else {
    WeightGradKernel<T, BA, 64><<<grid, kGemmThreads, 0, stream>>>(x, dy, nbr, d, chunk_rows, partials);
  }
}

// The row chunks of the weight gradient: at most kMaxChunks, each a multiple of kTileK rows.
struct Chunks {
  explicit Chunks(int64_t rows) {
    const int64_t per = std::max<int64_t>(1024, (rows + kMaxChunks - 1) / kMaxChunks);
    chunk_rows = (per + kTileK - 1) / kTileK * kTileK;
    count = (rows + chunk_rows - 1) / chunk_rows;
  }
  int64_t chunk_rows, count;
};

template <typename T>
ffi::Error WeightGrad(const std::string& op, cudaStream_t stream, ffi::ScratchAllocator& scratch, const T* x,
                      const T* dy, const int32_t* nbr, const ConvDims& d, T* d_kernel) {
  const Chunks chunks(d.n_out);
  const int64_t size = d.taps * d.a * d.c_out();
  float* partials = AllocateScratch<float>(scratch, chunks.count * size);
  if (partials == nullptr) return ScratchError(op, chunks.count * size * 4);
  if (chunks.count > 0 && size > 0) {
    if (TileWidth(d.a) == 16) {
      LaunchWeightGradTiles<T, 16>(stream, x, dy, nbr, d, chunks.chunk_rows, chunks.count, partials);
    } else {
      LaunchWeightGradTiles<T, 64>(stream, x, dy, nbr, d, chunks.chunk_rows, chunks.count, partials);
    }
  }
  if (size > 0) SumChunksKernel<T><<<BlocksFor(size), kThreads, 0, stream>>>(partials, chunks.count, size, d_kernel);
  return ffi::Error::Success();
}

// Grid limits (65535 blocks along y and z): groups and taps x groups index grid dimensions z and
// y, and a group's output channels (b, or a for the input gradient) in tiles of up to 64 index y.
std::string CheckGrid(const std::string& op, const ConvDims& d) {
  if (d.groups > 65535 || d.taps * d.groups > 65535) {
    return op + "K x groups must stay below 65536 on CUDA";
  }
  if ((std::max(d.a, d.b) + 63) / 64 > 65535) {
    return op + "C_in // groups and C_out // groups must stay below 65535 x 64 = 4194240 on CUDA";
  }
  return {};
}

ffi::Error GatherGemmImpl(cudaStream_t stream, ffi::AnyBuffer features, ffi::AnyBuffer kernel, ffi::AnyBuffer nbr,
                          int64_t groups, int64_t reverse_taps, ffi::Result<ffi::AnyBuffer> out) {
  const std::string op = "jsparse_conv_gather_gemm: ";
  ConvDims d;
  std::string message = ValidateGatherGemm(features, kernel, nbr, groups, *out, &d);
  if (message.empty()) message = CheckGrid(op, d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    LaunchGatherGemm(stream, static_cast<const T*>(features.untyped_data()),
                     static_cast<const T*>(kernel.untyped_data()), nbr.typed_data<int32_t>(), d, reverse_taps != 0,
                     static_cast<T*>(out->untyped_data()));
  });
  return LaunchError(op);
}

ffi::Error WeightGradImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer features,
                          ffi::AnyBuffer d_out, ffi::AnyBuffer nbr, int64_t groups,
                          ffi::Result<ffi::AnyBuffer> d_kernel) {
  const std::string op = "jsparse_conv_weight_grad: ";
  ConvDims d;
  std::string message = ValidateWeightGrad(features, d_out, nbr, groups, *d_kernel, &d);
  if (message.empty()) message = CheckGrid(op, d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  ffi::Error error = DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return WeightGrad(op, stream, scratch, static_cast<const T*>(features.untyped_data()),
                      static_cast<const T*>(d_out.untyped_data()), nbr.typed_data<int32_t>(), d,
                      static_cast<T*>(d_kernel->untyped_data()));
  });
  if (error.failure()) return error;
  return LaunchError(op);
}

ffi::Error BackwardSymmetricImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer features,
                                 ffi::AnyBuffer d_out, ffi::AnyBuffer kernel_t, ffi::AnyBuffer nbr, int64_t groups,
                                 ffi::Result<ffi::AnyBuffer> d_features, ffi::Result<ffi::AnyBuffer> d_kernel) {
  const std::string op = "jsparse_conv_backward_symmetric: ";
  ConvDims d;
  std::string message = ValidateBackwardSymmetric(features, d_out, kernel_t, nbr, groups, *d_features, *d_kernel, &d);
  if (message.empty()) message = CheckGrid(op, d);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  // The input gradient reads d_out rows through the reversed taps, with kernel_t [K, b, G * a].
  const ConvDims transposed{d.n_out, d.n_in, d.taps, d.groups, d.b, d.a};
  ffi::Error error = DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const auto* dy = static_cast<const T*>(d_out.untyped_data());
    const int32_t* rows = nbr.typed_data<int32_t>();
    LaunchGatherGemm(stream, dy, static_cast<const T*>(kernel_t.untyped_data()), rows, transposed,
                     /*reverse_taps=*/true, static_cast<T*>(d_features->untyped_data()));
    return WeightGrad(op, stream, scratch, static_cast<const T*>(features.untyped_data()), dy, rows, d,
                      static_cast<T*>(d_kernel->untyped_data()));
  });
  if (error.failure()) return error;
  return LaunchError(op);
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvGatherGemmCuda, jsparse::GatherGemmImpl,
    ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>() JSPARSE_CONV_GATHER_GEMM_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvWeightGradCuda, jsparse::WeightGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()
        JSPARSE_CONV_WEIGHT_GRAD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvBackwardSymmetricCuda, jsparse::BackwardSymmetricImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()
        JSPARSE_CONV_BACKWARD_SYMMETRIC_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_gather_gemm", JsparseConvGatherGemmCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_weight_grad", JsparseConvWeightGradCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_backward_symmetric", JsparseConvBackwardSymmetricCuda);
