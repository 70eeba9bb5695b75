// Helpers shared by the CUDA handlers: launch sizes, launch errors, scratch memory from XLA,
// feature dtypes on the device, and fills. Every handler runs on XLA's stream, takes its
// temporary memory from XLA's allocator (ffi::ScratchAllocator) and never waits for the device.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "../common/args.h"
#include "xla/ffi/api/ffi.h"

namespace jsparse {

namespace ffi = xla::ffi;

constexpr int kThreads = 256;

// Blocks of `threads` that cover `n` items, at least 1, at most what a grid-stride loop needs.
inline unsigned int BlocksFor(int64_t n, int threads = kThreads) {
  const int64_t blocks = (std::max<int64_t>(n, 1) + threads - 1) / threads;
  return static_cast<unsigned int>(std::min<int64_t>(blocks, int64_t{1} << 20));
}

// Grid-stride loop over [0, n) with 64-bit indices.
#define JSPARSE_GRID_LOOP(i, n)                                                      \
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)

// The error of the last launch on this thread, as an FFI error naming `op`.
inline ffi::Error LaunchError(const std::string& op) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return ffi::Error::Success();
  return ffi::Error::Internal(op + "CUDA error: " + cudaGetErrorString(err));
}

// Device memory for `count` items of T from XLA's allocator, freed when the handler returns
// (XLA orders that after the work queued on its stream). nullptr when XLA has none to give.
template <typename T>
T* AllocateScratch(ffi::ScratchAllocator& scratch, int64_t count) {
  const auto bytes = static_cast<size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  const auto memory = scratch.Allocate(bytes, 256);
  return memory.has_value() ? static_cast<T*>(*memory) : nullptr;
}

inline ffi::Error ScratchError(const std::string& op, int64_t bytes) {
  return ffi::Error(ffi::ErrorCode::kResourceExhausted,
                    op + "XLA could not allocate " + std::to_string(bytes) + " bytes of scratch memory");
}

// Feature storage types on the device; kernels load them as float and accumulate in float.
__device__ __forceinline__ float ToFloat(float x) { return x; }
__device__ __forceinline__ float ToFloat(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float ToFloat(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T FromFloat(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __float2bfloat16_rn(x);
  } else {
    return __float2half_rn(x);
  }
}

// fn(static_cast<T*>(nullptr)) with T the device storage type of a validated feature dtype.
template <typename Fn>
auto DispatchFeatureType(ffi::DataType type, Fn&& fn) {
  switch (type) {
    case ffi::F32: return fn(static_cast<float*>(nullptr));
    case ffi::BF16: return fn(static_cast<__nv_bfloat16*>(nullptr));
    default: return fn(static_cast<__half*>(nullptr));
  }
}

template <typename T>
__global__ void FillKernel(T* data, int64_t n, T value) {
  JSPARSE_GRID_LOOP(i, n) data[i] = value;
}

// data[0:n] = value on `stream`.
template <typename T>
void Fill(cudaStream_t stream, T* data, int64_t n, T value) {
  if (n > 0) FillKernel<<<BlocksFor(n), kThreads, 0, stream>>>(data, n, value);
}

}  // namespace jsparse
