// Sparse pooling on CPU over a kernel map (jsparse.ops.sparse_max_pool / sparse_avg_pool).
//
// jsparse_pool_max: out[o, c] = max over the active taps k of x[nbr[o, k], c]; arg[o, c] is the
//   first tap (in kernel order) that holds the maximum, so ties resolve the same way everywhere.
// jsparse_pool_max_grad: dx[i, c] = sum over taps k of dy[o, c] where o = nbr_t[i, k] and
//   arg[o, c] == k: the gradient reaches exactly one input per (output, channel).
// jsparse_pool_avg: out[o] = (sum over the active taps of x[nbr[o, k]]) / counts[o].
// jsparse_pool_avg_grad: dx[i] = sum over taps k of scaled[o] where o = nbr_t[i, k] and
//   scaled = d_out / counts in float32, computed by the caller.
// Every handler is output-stationary: a task owns a tile of output rows and visits the taps in
// order with float32 accumulators, so results do not depend on the thread count. The jnp
// reference in jsparse/ops/_pool.py performs the same float32 operations in the same order.
#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/pool_args.h"
#include "../common/registry.h"
#include "features.h"
#include "float_convert.h"
#include "errors.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr int64_t kTileRows = 256;

int64_t NumTiles(int64_t rows) { return (rows + kTileRows - 1) / kTileRows; }

// ---- jsparse_pool_max ----

template <typename T>
ffi::Future PoolMax(ffi::ThreadPool& pool, const T* x, int64_t n_in, int64_t channels,
                    const int32_t* nbr, int64_t n_out, int64_t taps, T* out, int32_t* arg) {
  auto body = [=](int64_t task) {
    const int64_t first = task * kTileRows;
    const int64_t last = std::min(n_out, first + kTileRows);
    std::vector<float> best(channels);
    for (int64_t o = first; o < last; ++o) {
      int32_t* arg_row = arg + o * channels;
      std::fill_n(arg_row, channels, -1);
      for (int64_t k = 0; k < taps; ++k) {
        const int32_t i = nbr[o * taps + k];
        if (i < 0 || i >= n_in) continue;
        const T* row = x + i * channels;
        for (int64_t c = 0; c < channels; ++c) {
          const float v = ToFloat(row[c]);
          if (arg_row[c] < 0 || v > best[c]) {  // strictly greater: the first maximum wins
            best[c] = v;
            arg_row[c] = static_cast<int32_t>(k);
          }
        }
      }
      for (int64_t c = 0; c < channels; ++c) {
        out[o * channels + c] = FromFloat<T>(arg_row[c] < 0 ? 0.0f : best[c]);
      }
    }
  };
  return ParallelFor(pool, NumTiles(n_out), body);
}

ffi::Future PoolMaxImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer nbr,
                        ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> arg) {
  PoolDims d{};
  const std::string message = ValidatePoolMax(x, nbr, *out, *arg, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return PoolMax(pool, static_cast<const T*>(x.untyped_data()), d.n_src, d.channels,
                   nbr.typed_data<int32_t>(), d.n_dst, d.taps, static_cast<T*>(out->untyped_data()),
                   arg->typed_data<int32_t>());
  });
}

// ---- jsparse_pool_max_grad ----

template <typename T>
ffi::Future PoolMaxGrad(ffi::ThreadPool& pool, const T* dy, const int32_t* arg, int64_t n_out,
                        int64_t channels, const int32_t* nbr_t, int64_t n_in, int64_t taps, T* dx) {
  auto body = [=](int64_t task) {
    const int64_t first = task * kTileRows;
    const int64_t last = std::min(n_in, first + kTileRows);
    std::vector<float> acc(channels);
    for (int64_t i = first; i < last; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < taps; ++k) {
        const int32_t o = nbr_t[i * taps + k];
        if (o < 0 || o >= n_out) continue;
        const T* dy_row = dy + o * channels;
        const int32_t* arg_row = arg + o * channels;
        for (int64_t c = 0; c < channels; ++c) {
          if (arg_row[c] == k) acc[c] += ToFloat(dy_row[c]);
        }
      }
      for (int64_t c = 0; c < channels; ++c) dx[i * channels + c] = FromFloat<T>(acc[c]);
    }
  };
  return ParallelFor(pool, NumTiles(n_in), body);
}

ffi::Future PoolMaxGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer dy, ffi::AnyBuffer arg,
                            ffi::AnyBuffer nbr_t, ffi::Result<ffi::AnyBuffer> dx) {
  PoolDims d{};
  const std::string message = ValidatePoolMaxGrad(dy, arg, nbr_t, *dx, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(dy.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return PoolMaxGrad(pool, static_cast<const T*>(dy.untyped_data()), arg.typed_data<int32_t>(), d.n_src,
                       d.channels, nbr_t.typed_data<int32_t>(), d.n_dst, d.taps,
                       static_cast<T*>(dx->untyped_data()));
  });
}

// ---- jsparse_pool_avg and jsparse_pool_avg_grad ----

// out[r] = sum over taps of x[map[r, k]], times 1 / counts[r] when counts is given. The forward
// pass reads nbr with counts; the gradient reads nbr_t and float32 rows d_out / counts that the
// caller scaled (so no product is ever fused into a sum here). Means multiply by a float32
// reciprocal, as XLA does with a division by a broadcast operand, so the reference path rounds
// identically.
template <typename TIn, typename TOut>
ffi::Future GatherSum(ffi::ThreadPool& pool, const TIn* x, int64_t n_src, int64_t channels,
                      const int32_t* map, int64_t n_dst, int64_t taps, const int32_t* counts, TOut* out) {
  auto body = [=](int64_t task) {
    const int64_t first = task * kTileRows;
    const int64_t last = std::min(n_dst, first + kTileRows);
    std::vector<float> acc(channels);
    for (int64_t r = first; r < last; ++r) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t k = 0; k < taps; ++k) {
        const int32_t s = map[r * taps + k];
        if (s < 0 || s >= n_src) continue;
        const TIn* row = x + s * channels;
        for (int64_t c = 0; c < channels; ++c) acc[c] += ToFloat(row[c]);
      }
      if (counts != nullptr) {
        const float scale = 1.0f / static_cast<float>(std::max(counts[r], 1));
        for (float& a : acc) a *= scale;
      }
      for (int64_t c = 0; c < channels; ++c) out[r * channels + c] = FromFloat<TOut>(acc[c]);
    }
  };
  return ParallelFor(pool, NumTiles(n_dst), body);
}

ffi::Future PoolAvgImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer nbr,
                        ffi::AnyBuffer counts, ffi::Result<ffi::AnyBuffer> out) {
  PoolDims d{};
  const std::string message = ValidatePoolAvg(x, nbr, counts, *out, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(x.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return GatherSum(pool, static_cast<const T*>(x.untyped_data()), d.n_src, d.channels,
                     nbr.typed_data<int32_t>(), d.n_dst, d.taps, counts.typed_data<int32_t>(),
                     static_cast<T*>(out->untyped_data()));
  });
}

ffi::Future PoolAvgGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer scaled_dy, ffi::AnyBuffer nbr_t,
                            ffi::Result<ffi::AnyBuffer> dx) {
  PoolDims d{};
  const std::string message = ValidatePoolAvgGrad(scaled_dy, nbr_t, *dx, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(dx->element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return GatherSum(pool, scaled_dy.typed_data<float>(), d.n_src, d.channels, nbr_t.typed_data<int32_t>(),
                     d.n_dst, d.taps, static_cast<const int32_t*>(nullptr), static_cast<T*>(dx->untyped_data()));
  });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolMaxCpu, jsparse::PoolMaxImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_POOL_MAX_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolMaxGradCpu, jsparse::PoolMaxGradImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_POOL_MAX_GRAD_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolAvgCpu, jsparse::PoolAvgImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_POOL_AVG_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparsePoolAvgGradCpu, jsparse::PoolAvgGradImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_POOL_AVG_GRAD_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_max", JsparsePoolMaxCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_max_grad", JsparsePoolMaxGradCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_avg", JsparsePoolAvgCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_pool_avg_grad", JsparsePoolAvgGradCpu);
