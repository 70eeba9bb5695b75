// Attributes and argument checks of the kernel-map handlers (jsparse_kmap_*), shared by CPU and
// CUDA: the geometry attributes bind in one order on every device, and the same mistake gets the
// same message.
#pragma once

#include <cstdint>
#include <string>
#include <tuple>

#include "args.h"
#include "kmap.h"
#include "xla/ffi/api/ffi.h"

// The geometry attributes of every map handler, in the order GeometryAttrs lists them.
#define JSPARSE_MAP_GEOMETRY_ATTRS                        \
  .Attr<ffi::Span<const int64_t>>("kernel_size")          \
      .Attr<ffi::Span<const int64_t>>("stride")           \
      .Attr<ffi::Span<const int64_t>>("padding")          \
      .Attr<ffi::Span<const int64_t>>("dilation")         \
      .Attr<ffi::Span<const int64_t>>("in_spatial_shape") \
      .Attr<ffi::Span<const int64_t>>("out_spatial_shape") \
      .Attr<int64_t>("transpose")                         \
      .Attr<int64_t>("batch_size")

// The operands, attributes and results of each map handler, bound after the device's contexts
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_KMAP_..._SIGNATURE`): both devices bind the same ones in the
// same order, so a call built in Python fits either.
#define JSPARSE_KMAP_OUTPUT_SITES_SIGNATURE                                   \
  .Arg<ffi::AnyBuffer>()         /* indices int32 [N_in, 1 + ndim] */         \
      JSPARSE_MAP_GEOMETRY_ATTRS                                              \
      .Ret<ffi::AnyBuffer>()     /* out_indices int32 [capacity, 1 + ndim] */ \
      .Ret<ffi::AnyBuffer>()     /* num_out int32 [] */

#define JSPARSE_KMAP_NEIGHBORS_SIGNATURE                                                 \
  .Arg<ffi::AnyBuffer>()          /* in_indices int32 [N_in, 1 + ndim] */                \
      .Arg<ffi::AnyBuffer>()      /* out_indices int32 [N_out, 1 + ndim] */              \
      JSPARSE_MAP_GEOMETRY_ATTRS                                                         \
      .Attr<int64_t>("symmetric") /* 1: odd submanifold map, out_indices = in_indices */ \
      .Ret<ffi::AnyBuffer>()      /* nbr int32 [N_out, K] */                             \
      .Ret<ffi::AnyBuffer>()      /* nbr_t int32 [N_in, K] or [0, K] */

#define JSPARSE_KMAP_BUILD_SIGNATURE                                          \
  .Arg<ffi::AnyBuffer>()         /* indices int32 [N_in, 1 + ndim] */         \
      JSPARSE_MAP_GEOMETRY_ATTRS                                              \
      .Ret<ffi::AnyBuffer>()     /* out_indices int32 [capacity, 1 + ndim] */ \
      .Ret<ffi::AnyBuffer>()     /* num_out int32 [] */                       \
      .Ret<ffi::AnyBuffer>()     /* nbr int32 [capacity, K] */                \
      .Ret<ffi::AnyBuffer>()     /* nbr_t int32 [N_in, K] */

namespace jsparse {

struct GeometryAttrs {
  ffi::Span<const int64_t> kernel_size, stride, padding, dilation, in_shape, out_shape;
  int64_t transpose, batch_size;
};

inline std::string Geometry(const std::string& op, const GeometryAttrs& a, MapGeometry* g) {
  const size_t ndim = a.kernel_size.size();
  for (const auto* span : {&a.stride, &a.padding, &a.dilation, &a.in_shape, &a.out_shape}) {
    if (span->size() != ndim) return op + "every geometry attribute needs one entry per spatial dim";
  }
  return MakeMapGeometry(op, a.kernel_size.begin(), a.stride.begin(), a.padding.begin(), a.dilation.begin(),
                         a.in_shape.begin(), a.out_shape.begin(), ndim, a.transpose != 0, a.batch_size, g);
}

// `indices` is int32 [N, 1 + ndim] with N below 2**31.
inline std::string CheckIndices(const std::string& op, const char* name, const ffi::AnyBuffer& indices, int ndim) {
  const auto dims = indices.dimensions();
  if (indices.element_type() != ffi::S32 || dims.size() != 2 || dims[1] != 1 + ndim) {
    return op + name + " must be int32 [N, 1 + ndim] = [N, " + std::to_string(1 + ndim) +
           "] (batch index, then coordinates)";
  }
  if (dims[0] >= (int64_t{1} << 31)) return op + name + " has more rows than int32 row numbers reach";
  return {};
}

inline std::string CheckCount(const std::string& op, const ffi::AnyBuffer& num_out) {
  if (num_out.element_type() != ffi::S32 || num_out.dimensions().size() != 0) {
    return op + "num_out must be an int32 scalar";
  }
  return {};
}

// jsparse_kmap_output_sites: indices [N_in, 1 + ndim] -> out_indices [capacity, 1 + ndim], num_out.
inline std::string ValidateOutputSites(const ffi::AnyBuffer& indices, const GeometryAttrs& attrs,
                                       const ffi::AnyBuffer& out_indices, const ffi::AnyBuffer& num_out,
                                       MapGeometry* g) {
  const std::string op = "jsparse_kmap_output_sites: ";
  std::string message = Geometry(op, attrs, g);
  if (message.empty()) message = CheckIndices(op, "indices", indices, g->ndim);
  if (message.empty()) message = CheckIndices(op, "out_indices", out_indices, g->ndim);
  if (message.empty()) message = CheckCount(op, num_out);
  return message;
}

// jsparse_kmap_neighbors: nbr [N_out, K] and nbr_t [N_in, K] (or [0, K] to skip it).
inline std::string ValidateNeighbors(const ffi::AnyBuffer& in_indices, const ffi::AnyBuffer& out_indices,
                                     const GeometryAttrs& attrs, bool symmetric, const ffi::AnyBuffer& nbr,
                                     const ffi::AnyBuffer& nbr_t, MapGeometry* g) {
  const std::string op = "jsparse_kmap_neighbors: ";
  std::string message = Geometry(op, attrs, g);
  if (message.empty()) message = CheckIndices(op, "in_indices", in_indices, g->ndim);
  if (message.empty()) message = CheckIndices(op, "out_indices", out_indices, g->ndim);
  if (!message.empty()) return message;
  const int64_t n_in = in_indices.dimensions()[0];
  const int64_t n_out = out_indices.dimensions()[0];
  const auto nd = nbr.dimensions();
  const auto td = nbr_t.dimensions();
  if (nbr.element_type() != ffi::S32 || nd.size() != 2 || nd[0] != n_out || nd[1] != g->taps) {
    return op + "nbr must be int32 [N_out, K] = [" + std::to_string(n_out) + ", " + std::to_string(g->taps) + "]";
  }
  if (nbr_t.element_type() != ffi::S32 || td.size() != 2 || (td[0] != n_in && td[0] != 0) || td[1] != g->taps) {
    return op + "nbr_t must be int32 [N_in, K], or [0, K] to skip the transpose";
  }
  if (symmetric && (n_in != n_out || g->transpose || g->taps % 2 == 0)) {
    return op + "symmetric maps need odd submanifold kernels with out_indices = in_indices";
  }
  return {};
}

// jsparse_kmap_build: out_indices [capacity, 1 + ndim], num_out, nbr [capacity, K], nbr_t [N_in, K].
inline std::string ValidateBuildMap(const ffi::AnyBuffer& indices, const GeometryAttrs& attrs,
                                    const ffi::AnyBuffer& out_indices, const ffi::AnyBuffer& num_out,
                                    const ffi::AnyBuffer& nbr, const ffi::AnyBuffer& nbr_t, MapGeometry* g) {
  const std::string op = "jsparse_kmap_build: ";
  std::string message = Geometry(op, attrs, g);
  if (message.empty()) message = CheckIndices(op, "indices", indices, g->ndim);
  if (message.empty()) message = CheckIndices(op, "out_indices", out_indices, g->ndim);
  if (message.empty()) message = CheckCount(op, num_out);
  if (!message.empty()) return message;
  const int64_t n = indices.dimensions()[0];
  const int64_t capacity = out_indices.dimensions()[0];
  for (auto [buffer, rows, name] : {std::tuple{&nbr, capacity, "nbr [capacity, K]"},
                                    std::tuple{&nbr_t, n, "nbr_t [N_in, K]"}}) {
    const auto dims = buffer->dimensions();
    if (buffer->element_type() != ffi::S32 || dims.size() != 2 || dims[0] != rows || dims[1] != g->taps) {
      return op + name + " must be int32 with K = " + std::to_string(g->taps) + " taps";
    }
  }
  if (static_cast<double>(n) * g->taps >= 4294967296.0) {
    return op + "N_in x K must stay below 2**32 (the candidates' (row, tap) payload)";
  }
  return {};
}

}  // namespace jsparse
