// Kernel-map geometry shared by the CPU and CUDA map builders: which site a kernel tap connects,
// and sites packed into 64-bit keys (batch most significant, so key order is (batch, coords)
// order). Mirrors jsparse/ops/_kmap.py: for output q, input p, tap index t, per axis
//   conv / pool / subm:  p = q * s - pad + t * d
//   transpose:           q = p * s - pad + t * d
#pragma once

#include <cstdint>
#include <numeric>
#include <string>
#include <type_traits>

#include "device.h"

namespace jsparse {

inline constexpr int kMaxMapNdim = 8;

struct MapGeometry {
  int ndim = 0;
  bool transpose = false;
  int64_t taps = 1;
  int64_t batch_size = 1;
  int64_t kernel[kMaxMapNdim], stride[kMaxMapNdim], padding[kMaxMapNdim], dilation[kMaxMapNdim];
  int64_t in_shape[kMaxMapNdim], out_shape[kMaxMapNdim];
};

// The functions below take the number of spatial dims as a template argument where it is known
// at compile time (kNdim = 1..4: loops unroll and values stay in registers); kNdim = 0 reads it
// from the geometry.
template <int kNdim>
JSPARSE_HD inline int Ndim(const MapGeometry& g) {
  return kNdim > 0 ? kNdim : g.ndim;
}

// True iff row (batch, coords) is an active site of a grid of `shape` and the batch.
template <int kNdim = 0>
JSPARSE_HD inline bool SiteInRange(const MapGeometry& g, const int32_t* row, const int64_t* shape) {
  if (row[0] < 0 || row[0] >= g.batch_size) return false;
  for (int j = 0; j < Ndim<kNdim>(g); ++j) {
    if (row[1 + j] < 0 || row[1 + j] >= shape[j]) return false;
  }
  return true;
}

// Sum of the kernel sizes: the length of the per-axis coordinate table below.
JSPARSE_HD inline int64_t AxisTableSize(const MapGeometry& g) {
  int64_t size = 0;
  for (int j = 0; j < g.ndim; ++j) size += g.kernel[j];
  return size;
}

// Per axis j and tap index t along it, the coordinate that output coords `q` read (sources) or
// that input coords `p` reach (targets), or -1 when there is none or it leaves the grid. Axis j's
// entries start at the sum of the earlier kernel sizes. Divisions happen once per axis here
// rather than once per tap.
// table[t] = (n0 - t * step) / stride where that is exact, non-negative and below `limit`, else -1,
// for t < count: one division for the whole axis instead of one per tap.
JSPARSE_HD inline void DividedTaps(int64_t n0, int64_t step, int64_t stride, int64_t count, int64_t limit,
                                   int64_t* table) {
  if (n0 < 0) {
    for (int64_t t = 0; t < count; ++t) table[t] = -1;
    return;
  }
  int64_t quotient = n0 / stride, remainder = n0 - quotient * stride;
  for (int64_t t = 0; t < count; ++t) {
    table[t] = remainder == 0 && quotient >= 0 && quotient < limit ? quotient : -1;
    for (remainder -= step; remainder < 0; remainder += stride) --quotient;  // next numerator
  }
}

template <int kNdim = 0>
JSPARSE_HD inline void AxisSources(const MapGeometry& g, const int32_t* q, int64_t* table) {
  for (int j = 0; j < Ndim<kNdim>(g); ++j) {
    if (g.transpose) {
      DividedTaps(q[j] + g.padding[j], g.dilation[j], g.stride[j], g.kernel[j], g.in_shape[j], table);
      table += g.kernel[j];
      continue;
    }
    for (int64_t t = 0; t < g.kernel[j]; ++t) {
      const int64_t p = q[j] * g.stride[j] - g.padding[j] + t * g.dilation[j];
      *table++ = p >= 0 && p < g.in_shape[j] ? p : -1;
    }
  }
}

template <int kNdim = 0>
JSPARSE_HD inline void AxisTargets(const MapGeometry& g, const int32_t* p, int64_t* table) {
  for (int j = 0; j < Ndim<kNdim>(g); ++j) {
    if (!g.transpose) {
      DividedTaps(p[j] + g.padding[j], g.dilation[j], g.stride[j], g.kernel[j], g.out_shape[j], table);
      table += g.kernel[j];
      continue;
    }
    for (int64_t t = 0; t < g.kernel[j]; ++t) {
      const int64_t q = p[j] * g.stride[j] - g.padding[j] + t * g.dilation[j];
      *table++ = q >= 0 && q < g.out_shape[j] ? q : -1;
    }
  }
}

namespace detail {

// Depth-first over the kernel axes: a prefix whose coordinate is invalid prunes its subtree, and
// the key is extended one axis at a time (Horner), so a tap costs a multiply-add.
template <int kNdim, int kLevel, typename Visit>
JSPARSE_HD inline void ForEachTapFrom(const MapGeometry& g, int level, const int64_t* axis,
                                      int64_t tap, uint64_t key, const int64_t* shape, Visit& visit) {
  const int l = kNdim > 0 ? kLevel : level;
  const int64_t k = g.kernel[l];
  for (int64_t t = 0; t < k; ++t) {
    const int64_t c = axis[t];
    if (c < 0) continue;
    const uint64_t next = key * static_cast<uint64_t>(shape[l]) + static_cast<uint64_t>(c);
    if constexpr (kNdim > 0) {
      if constexpr (kLevel + 1 == kNdim) {
        visit(tap * k + t, next);
      } else {
        ForEachTapFrom<kNdim, kLevel + 1>(g, 0, axis + k, tap * k + t, next, shape, visit);
      }
    } else if (level + 1 == g.ndim) {
      visit(tap * k + t, next);
    } else {
      ForEachTapFrom<0, 0>(g, level + 1, axis + k, tap * k + t, next, shape, visit);
    }
  }
}

}  // namespace detail

// Calls visit(tap, key) for every tap (row-major over the kernel, in increasing order) whose
// coordinates in `table` (from AxisSources / AxisTargets) are all valid, with the site packed
// over `shape`.
template <int kNdim = 0, typename Visit>
JSPARSE_HD inline void ForEachTap(const MapGeometry& g, int64_t batch, const int64_t* table,
                                  const int64_t* shape, Visit visit) {
  detail::ForEachTapFrom<kNdim, 0>(g, 0, table, 0, static_cast<uint64_t>(batch), shape, visit);
}

// Calls fn(std::integral_constant<int, kNdim>()) with kNdim = ndim for 1 to 4 dims, else 0.
template <typename Fn>
inline auto DispatchNdim(int ndim, Fn&& fn) {
  switch (ndim) {
    case 1: return fn(std::integral_constant<int, 1>());
    case 2: return fn(std::integral_constant<int, 2>());
    case 3: return fn(std::integral_constant<int, 3>());
    case 4: return fn(std::integral_constant<int, 4>());
    default: return fn(std::integral_constant<int, 0>());
  }
}

JSPARSE_HD inline uint64_t PackSite(int64_t batch, const int64_t* coords, const int64_t* shape, int ndim) {
  uint64_t key = static_cast<uint64_t>(batch);
  for (int j = 0; j < ndim; ++j) key = key * static_cast<uint64_t>(shape[j]) + static_cast<uint64_t>(coords[j]);
  return key;
}

JSPARSE_HD inline void UnpackSite(uint64_t key, const int64_t* shape, int ndim, int32_t* row) {
  for (int j = ndim - 1; j >= 0; --j) {
    row[1 + j] = static_cast<int32_t>(key % static_cast<uint64_t>(shape[j]));
    key /= static_cast<uint64_t>(shape[j]);
  }
  row[0] = static_cast<int32_t>(key);
}

// Most taps of one input that can reach an output: along an axis, tap t reaches one iff
// t * d = const (mod s), which holds for at most ceil(k / (s / gcd(d, s))) taps.
inline int64_t MaxTargetsPerInput(const MapGeometry& g) {
  if (g.transpose) return g.taps;
  int64_t most = 1;
  for (int j = 0; j < g.ndim; ++j) {
    const int64_t period = g.stride[j] / std::gcd(g.dilation[j], g.stride[j]);
    most *= (g.kernel[j] + period - 1) / period;
  }
  return most;
}

// Number of output sites of the grid (batch_size x prod(out_shape)): packed keys lie below it.
inline double OutputKeyRange(const MapGeometry& g) {
  double range = static_cast<double>(g.batch_size);
  for (int j = 0; j < g.ndim; ++j) range *= static_cast<double>(g.out_shape[j]);
  return range;
}

// Checks the attributes of a map handler and fills `g`; returns an error message or "".
inline std::string MakeMapGeometry(const std::string& op, const int64_t* kernel, const int64_t* stride,
                                   const int64_t* padding, const int64_t* dilation,
                                   const int64_t* in_shape, const int64_t* out_shape, size_t ndim,
                                   bool transpose, int64_t batch_size, MapGeometry* g) {
  if (ndim < 1 || ndim > static_cast<size_t>(kMaxMapNdim)) {
    return op + "maps have 1 to " + std::to_string(kMaxMapNdim) + " spatial dims, got " + std::to_string(ndim);
  }
  if (batch_size < 1) return op + "batch_size must be positive, got " + std::to_string(batch_size);
  g->ndim = static_cast<int>(ndim);
  g->transpose = transpose;
  g->batch_size = batch_size;
  g->taps = 1;
  // Keys must fit in 63 bits: batch_size * prod(shape) for the input and the output grid.
  double in_sites = static_cast<double>(batch_size), out_sites = in_sites;
  for (size_t j = 0; j < ndim; ++j) {
    if (kernel[j] < 1 || stride[j] < 1 || dilation[j] < 1 || padding[j] < 0 || in_shape[j] < 1 ||
        out_shape[j] < 1) {
      return op + "axis " + std::to_string(j) + ": need kernel_size, stride, dilation, spatial shapes >= 1 " +
             "and padding >= 0";
    }
    g->kernel[j] = kernel[j];
    g->stride[j] = stride[j];
    g->padding[j] = padding[j];
    g->dilation[j] = dilation[j];
    g->in_shape[j] = in_shape[j];
    g->out_shape[j] = out_shape[j];
    g->taps *= kernel[j];
    in_sites *= static_cast<double>(in_shape[j]);
    out_sites *= static_cast<double>(out_shape[j]);
  }
  if (in_sites >= 4.6e18 || out_sites >= 4.6e18) {
    return op + "batch_size * prod(spatial_shape) must stay below 2**62 to pack sites into 64-bit keys";
  }
  return {};
}

}  // namespace jsparse
