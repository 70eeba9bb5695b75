// Argument checks of the convolution handlers (jsparse_conv_*), shared by CPU and CUDA.
#pragma once

#include <cstdint>
#include <string>

#include "args.h"
#include "device.h"
#include "xla/ffi/api/ffi.h"

// The operands, attributes and results of each handler, bound after the device's contexts
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_CONV_..._SIGNATURE`): both devices bind the same ones in
// the same order, so a call built in Python fits either.
#define JSPARSE_CONV_GATHER_GEMM_SIGNATURE                                    \
  .Arg<ffi::AnyBuffer>()             /* features [N_in, C_in] */              \
      .Arg<ffi::AnyBuffer>()         /* kernel [K, C_in // groups, C_out] */  \
      .Arg<ffi::AnyBuffer>()         /* nbr int32 [N_out, K] */               \
      .Attr<int64_t>("groups")       /* channel groups */                     \
      .Attr<int64_t>("reverse_taps") /* 1: tap k reads nbr[:, K - 1 - k] */   \
      .Ret<ffi::AnyBuffer>()         /* out [N_out, C_out] */

#define JSPARSE_CONV_WEIGHT_GRAD_SIGNATURE                                    \
  .Arg<ffi::AnyBuffer>()             /* features [N_in, C_in] */              \
      .Arg<ffi::AnyBuffer>()         /* d_out [N_out, C_out] */               \
      .Arg<ffi::AnyBuffer>()         /* nbr int32 [N_out, K] */               \
      .Attr<int64_t>("groups")       /* channel groups */                     \
      .Ret<ffi::AnyBuffer>()         /* d_kernel [K, C_in // groups, C_out] */

#define JSPARSE_CONV_BACKWARD_SYMMETRIC_SIGNATURE                                                   \
  .Arg<ffi::AnyBuffer>()             /* features [N, C_in] */                                       \
      .Arg<ffi::AnyBuffer>()         /* d_out [N, C_out] */                                         \
      .Arg<ffi::AnyBuffer>()         /* kernel_t [K, C_out // groups, C_in]: per group transposed */ \
      .Arg<ffi::AnyBuffer>()         /* nbr int32 [N, K], an odd submanifold map */                 \
      .Attr<int64_t>("groups")       /* channel groups */                                           \
      .Ret<ffi::AnyBuffer>()         /* d_features [N, C_in] */                                     \
      .Ret<ffi::AnyBuffer>()         /* d_kernel [K, C_in // groups, C_out] */

namespace jsparse {

// The channel layout shared by the handlers: C_in = groups * a, C_out = groups * b. Passed to
// CUDA kernels by value.
struct ConvDims {
  int64_t n_in, n_out, taps, groups, a, b;
  JSPARSE_HD int64_t c_in() const { return groups * a; }
  JSPARSE_HD int64_t c_out() const { return groups * b; }
};

// Checks features [N_in, C_in], kernel-shaped [K, a, G * b] and nbr int32 [N_out, K]; fills dims.
inline std::string ValidateConvArgs(const std::string& op, const ffi::AnyBuffer& features,
                                    ffi::AnyBuffer::Dimensions kernel_dims, ffi::DataType kernel_type,
                                    const ffi::AnyBuffer& nbr, int64_t groups, ConvDims* dims) {
  const auto f = features.dimensions();
  const auto n = nbr.dimensions();
  if (!IsFeatureType(features.element_type())) {
    return op + "features must be float32, bfloat16 or float16";
  }
  if (kernel_type != features.element_type()) {
    return op + "features and kernel must have the same dtype; cast one of them";
  }
  if (f.size() != 2) return op + "features must be [N, C_in], got shape " + Shape(f);
  if (kernel_dims.size() != 3) {
    return op + "kernel must be [K, C_in // groups, C_out], got shape " + Shape(kernel_dims);
  }
  if (nbr.element_type() != ffi::S32 || n.size() != 2 || n[1] != kernel_dims[0]) {
    return op + "nbr must be int32 [N_out, K] with K = " + std::to_string(kernel_dims[0]) +
           " kernel taps, got shape " + Shape(n);
  }
  if (groups < 1 || f[1] % groups != 0 || kernel_dims[2] % groups != 0 ||
      kernel_dims[1] * groups != f[1]) {
    return op + "with groups = " + std::to_string(groups) + ", C_in (" + std::to_string(f[1]) +
           ") and C_out (" + std::to_string(kernel_dims[2]) +
           ") must be divisible by groups and the kernel's input axis must be C_in // groups, "
           "got kernel shape " + Shape(kernel_dims);
  }
  *dims = {f[0], n[0], kernel_dims[0], groups, kernel_dims[1], kernel_dims[2] / groups};
  return {};
}

// jsparse_conv_gather_gemm: out [N_out, C_out] in the features' dtype.
inline std::string ValidateGatherGemm(const ffi::AnyBuffer& features, const ffi::AnyBuffer& kernel,
                                      const ffi::AnyBuffer& nbr, int64_t groups, const ffi::AnyBuffer& out,
                                      ConvDims* d) {
  const std::string op = "jsparse_conv_gather_gemm: ";
  std::string message = ValidateConvArgs(op, features, kernel.dimensions(), kernel.element_type(), nbr, groups, d);
  const auto out_dims = out.dimensions();
  if (message.empty() && (out.element_type() != features.element_type() || out_dims.size() != 2 ||
                          out_dims[0] != d->n_out || out_dims[1] != d->c_out())) {
    message = op + "the output must be [N_out, C_out] = [" + std::to_string(d->n_out) + ", " +
              std::to_string(d->c_out()) + "] in the features' dtype";
  }
  return message;
}

// jsparse_conv_weight_grad: d_out [N_out, C_out], d_kernel [K, C_in // groups, C_out].
inline std::string ValidateWeightGrad(const ffi::AnyBuffer& features, const ffi::AnyBuffer& d_out,
                                      const ffi::AnyBuffer& nbr, int64_t groups, const ffi::AnyBuffer& d_kernel,
                                      ConvDims* d) {
  const std::string op = "jsparse_conv_weight_grad: ";
  std::string message =
      ValidateConvArgs(op, features, d_kernel.dimensions(), d_kernel.element_type(), nbr, groups, d);
  const auto y = d_out.dimensions();
  if (message.empty() && (d_out.element_type() != features.element_type() || y.size() != 2 ||
                          y[0] != d->n_out || y[1] != d->c_out())) {
    message = op + "d_out must be [N_out, C_out] = [" + std::to_string(d->n_out) + ", " +
              std::to_string(d->c_out()) + "] in the features' dtype, got shape " + Shape(y);
  }
  return message;
}

// jsparse_conv_backward_symmetric: a submanifold map (N_in = N_out), d_out [N, C_out],
// kernel_t [K, C_out // groups, C_in], d_features [N, C_in], d_kernel [K, C_in // groups, C_out].
inline std::string ValidateBackwardSymmetric(const ffi::AnyBuffer& features, const ffi::AnyBuffer& d_out,
                                             const ffi::AnyBuffer& kernel_t, const ffi::AnyBuffer& nbr,
                                             int64_t groups, const ffi::AnyBuffer& d_features,
                                             const ffi::AnyBuffer& d_kernel, ConvDims* d) {
  const std::string op = "jsparse_conv_backward_symmetric: ";
  std::string message =
      ValidateConvArgs(op, features, d_kernel.dimensions(), d_kernel.element_type(), nbr, groups, d);
  const auto y = d_out.dimensions();
  const auto t = kernel_t.dimensions();
  const auto dx = d_features.dimensions();
  const auto dtype = features.element_type();
  if (message.empty() && (d_out.element_type() != dtype || kernel_t.element_type() != dtype ||
                          d_features.element_type() != dtype)) {
    message = op + "d_out, kernel_t and d_features must have the features' dtype";
  }
  if (message.empty() && (d->n_in != d->n_out || y.size() != 2 || y[0] != d->n_out || y[1] != d->c_out() ||
                          t.size() != 3 || t[0] != d->taps || t[1] != d->b || t[2] != d->c_in() ||
                          dx.size() != 2 || dx[0] != d->n_in || dx[1] != d->c_in())) {
    message = op + "expects a submanifold map (N_in = N_out = N), d_out [N, C_out], kernel_t [K, C_out // groups, "
              "C_in] and returns d_features [N, C_in]; got d_out " + Shape(y) + ", kernel_t " + Shape(t) +
              ", nbr rows " + std::to_string(d->n_out) + ", features rows " + std::to_string(d->n_in);
  }
  return message;
}

}  // namespace jsparse
