// Argument checks of the pooling handlers (jsparse_pool_*), shared by CPU and CUDA: the same
// mistake gets the same message on every device. Host code only.
#pragma once

#include <cstdint>
#include <string>

#include "args.h"
#include "xla/ffi/api/ffi.h"

// The operands and results of each handler, bound after the device's context
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_POOL_..._SIGNATURE`): both devices bind the same ones in the
// same order, so a call built in Python fits either.
#define JSPARSE_POOL_MAX_SIGNATURE                                                          \
  .Arg<ffi::AnyBuffer>()     /* features [N_in, C] */                                       \
      .Arg<ffi::AnyBuffer>() /* nbr int32 [N_out, K] */                                     \
      .Ret<ffi::AnyBuffer>() /* out [N_out, C] */                                           \
      .Ret<ffi::AnyBuffer>() /* arg int32 [N_out, C]: the tap of the maximum, -1 if none */

#define JSPARSE_POOL_MAX_GRAD_SIGNATURE                  \
  .Arg<ffi::AnyBuffer>()     /* d_out [N_out, C] */      \
      .Arg<ffi::AnyBuffer>() /* arg int32 [N_out, C] */  \
      .Arg<ffi::AnyBuffer>() /* nbr_t int32 [N_in, K] */ \
      .Ret<ffi::AnyBuffer>() /* d_features [N_in, C] */

#define JSPARSE_POOL_AVG_SIGNATURE                                                  \
  .Arg<ffi::AnyBuffer>()     /* features [N_in, C] */                               \
      .Arg<ffi::AnyBuffer>() /* nbr int32 [N_out, K] */                             \
      .Arg<ffi::AnyBuffer>() /* counts int32 [N_out]: active taps per output row */ \
      .Ret<ffi::AnyBuffer>() /* out [N_out, C] */

#define JSPARSE_POOL_AVG_GRAD_SIGNATURE                              \
  .Arg<ffi::AnyBuffer>()     /* float32 d_out / counts [N_out, C] */ \
      .Arg<ffi::AnyBuffer>() /* nbr_t int32 [N_in, K] */             \
      .Ret<ffi::AnyBuffer>() /* d_features [N_in, C] */

namespace jsparse {

// The sizes of a pooling handler. Each one reads rows of a source buffer [n_src, channels]
// through a kernel map [n_dst, taps] and writes [n_dst, channels]: features through nbr for the
// forward passes, d_out (and arg) through nbr_t for the gradients.
struct PoolDims {
  int64_t n_src, n_dst, taps, channels;
};

// The checks the four handlers share (a namespace of their own, as these names are generic).
namespace pool_args {

// Checks that `src` is a feature buffer [n_src, C] and `map` an int32 [n_dst, K] kernel map;
// fills `d` when they are.
inline std::string CheckRowsAndMap(const std::string& op, const char* src_name, const ffi::AnyBuffer& src,
                                   const char* map_name, const ffi::AnyBuffer& map, PoolDims* d) {
  const auto s = src.dimensions();
  const auto m = map.dimensions();
  if (!IsFeatureType(src.element_type())) return op + src_name + " must be float32, bfloat16 or float16";
  if (s.size() != 2) return op + src_name + " must be [N, C], got shape " + Shape(s);
  if (map.element_type() != ffi::S32 || m.size() != 2) {
    return op + map_name + " must be an int32 kernel map [N, K], got shape " + Shape(m);
  }
  *d = {s[0], m[0], m[1], s[1]};
  return {};
}

// Checks that `buffer` has `type` and dimensions [rows, cols].
inline std::string CheckMatrix(const std::string& op, const char* name, const ffi::AnyBuffer& buffer,
                               ffi::DataType type, int64_t rows, int64_t cols) {
  const auto dims = buffer.dimensions();
  if (buffer.element_type() != type || dims.size() != 2 || dims[0] != rows || dims[1] != cols) {
    return op + name + " must be [" + std::to_string(rows) + ", " + std::to_string(cols) +
           "] with the expected dtype, got shape " + Shape(dims);
  }
  return {};
}

// Checks counts int32 [rows].
inline std::string CheckCounts(const std::string& op, const ffi::AnyBuffer& counts, int64_t rows) {
  const auto dims = counts.dimensions();
  if (counts.element_type() != ffi::S32 || dims.size() != 1 || dims[0] != rows) {
    return op + "counts must be int32 [" + std::to_string(rows) + "] (active taps per output row)";
  }
  return {};
}

}  // namespace pool_args

// jsparse_pool_max: features [N_in, C], nbr int32 [N_out, K] -> out [N_out, C] in the features'
// dtype, arg int32 [N_out, C].
inline std::string ValidatePoolMax(const ffi::AnyBuffer& x, const ffi::AnyBuffer& nbr, const ffi::AnyBuffer& out,
                                   const ffi::AnyBuffer& arg, PoolDims* d) {
  const std::string op = "jsparse_pool_max: ";
  std::string message = pool_args::CheckRowsAndMap(op, "features", x, "nbr", nbr, d);
  if (message.empty()) message = pool_args::CheckMatrix(op, "out", out, x.element_type(), d->n_dst, d->channels);
  if (message.empty()) message = pool_args::CheckMatrix(op, "arg", arg, ffi::S32, d->n_dst, d->channels);
  return message;
}

// jsparse_pool_max_grad: d_out [N_out, C], arg int32 [N_out, C], nbr_t int32 [N_in, K] ->
// d_features [N_in, C] in d_out's dtype.
inline std::string ValidatePoolMaxGrad(const ffi::AnyBuffer& dy, const ffi::AnyBuffer& arg,
                                       const ffi::AnyBuffer& nbr_t, const ffi::AnyBuffer& dx, PoolDims* d) {
  const std::string op = "jsparse_pool_max_grad: ";
  std::string message = pool_args::CheckRowsAndMap(op, "d_out", dy, "nbr_t", nbr_t, d);
  if (message.empty()) message = pool_args::CheckMatrix(op, "arg", arg, ffi::S32, d->n_src, d->channels);
  if (message.empty()) {
    message = pool_args::CheckMatrix(op, "d_features", dx, dy.element_type(), d->n_dst, d->channels);
  }
  return message;
}

// jsparse_pool_avg: features [N_in, C], nbr int32 [N_out, K], counts int32 [N_out] -> out
// [N_out, C] in the features' dtype.
inline std::string ValidatePoolAvg(const ffi::AnyBuffer& x, const ffi::AnyBuffer& nbr, const ffi::AnyBuffer& counts,
                                   const ffi::AnyBuffer& out, PoolDims* d) {
  const std::string op = "jsparse_pool_avg: ";
  std::string message = pool_args::CheckRowsAndMap(op, "features", x, "nbr", nbr, d);
  if (message.empty()) message = pool_args::CheckCounts(op, counts, d->n_dst);
  if (message.empty()) message = pool_args::CheckMatrix(op, "out", out, x.element_type(), d->n_dst, d->channels);
  return message;
}

// jsparse_pool_avg_grad: float32 d_out / counts [N_out, C], nbr_t int32 [N_in, K] -> d_features
// [N_in, C] in a feature dtype.
inline std::string ValidatePoolAvgGrad(const ffi::AnyBuffer& scaled_dy, const ffi::AnyBuffer& nbr_t,
                                       const ffi::AnyBuffer& dx, PoolDims* d) {
  const std::string op = "jsparse_pool_avg_grad: ";
  std::string message = pool_args::CheckRowsAndMap(op, "scaled d_out", scaled_dy, "nbr_t", nbr_t, d);
  if (message.empty() && scaled_dy.element_type() != ffi::F32) {
    message = op + "scaled d_out (d_out / counts) must be float32";
  }
  if (message.empty() && !IsFeatureType(dx.element_type())) {
    message = op + "d_features must be float32, bfloat16 or float16";
  }
  if (message.empty()) {
    message = pool_args::CheckMatrix(op, "d_features", dx, dx.element_type(), d->n_dst, d->channels);
  }
  return message;
}

}  // namespace jsparse
