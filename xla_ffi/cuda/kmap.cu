// Kernel maps on CUDA: the targets of xla_ffi/cpu/kmap.cc, with the same results (see there and
// jsparse/ops/_kmap.py for the semantics).
//
// jsparse_kmap_output_sites and jsparse_kmap_build sort candidates: every input row writes the
//   packed keys of the output sites it reaches (at most MaxTargetsPerInput per row, unused slots
//   hold a sentinel above every key) with the payload input_row * K + tap; a stable radix sort
//   (cub) orders them by key, equal keys in payload order; a key's first candidate is flagged and
//   an inclusive scan of the flags gives each candidate its output row. Outputs therefore come
//   sorted by (batch, coords), deduplicated, and sites past the capacity are counted in num_out,
//   not written. nbr[o, t] takes the smallest input row (atomicMin: only repeated input sites
//   compete), nbr_t[i, t] has one writer.
// jsparse_kmap_neighbors looks sites up in an open-addressing table of packed keys (keys by
//   compare-and-swap, rows by atomicMin, so the smallest row holds a repeated site whatever the
//   schedule). Symmetric maps (odd submanifold, outputs = inputs) gather: one thread per
//   (output row, tap) finds the source site. Other maps scatter, as on CPU: a table of the
//   outputs, and one thread per (input row, tap) finds the output it reaches, writes nbr_t and
//   takes the minimum for nbr.
// Rows with a batch index outside [0, batch_size) or coordinates outside the grid are inactive:
// never hashed, looked up or written through. -1 is all ones, so -1 fills are byte memsets, and
// an atomicMin on the unsigned view of a cell keeps -1 only where nobody writes.
#include <cuda_runtime.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <cstdint>
#include <string>
#include <utility>

#include "../common/hash.h"
#include "../common/kmap.h"
#include "../common/kmap_args.h"
#include "../common/registry.h"
#include "cuda_util.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr uint64_t kEmptyKey = ~0ull;  // packed keys stay below 2**62
// Per-thread table of per-axis tap coordinates (AxisTargets): the kernel sizes' sum is bounded.
constexpr int kMaxAxisTable = 128;

void SetMinusOne(cudaStream_t stream, int32_t* data, int64_t count) {
  if (count > 0) cudaMemsetAsync(data, 0xFF, static_cast<size_t>(count) * sizeof(int32_t), stream);
}

// Bits that hold every value up to and including `value`.
int BitLength(uint64_t value) {
  int bits = 1;
  while (bits < 64 && (value >> bits) != 0) ++bits;
  return bits;
}

// ---- candidates: jsparse_kmap_output_sites and jsparse_kmap_build ----

// Candidates of input row r in slots [r * per_row, (r + 1) * per_row): keys in tap order, then
// the sentinel; payload r * K + tap where `payload` is given.
template <int kNdim>
__global__ void CandidatesKernel(MapGeometry g, const int32_t* __restrict__ in, int64_t n, int64_t per_row,
                                 uint64_t sentinel, uint64_t* __restrict__ keys, uint32_t* __restrict__ payload) {
  JSPARSE_GRID_LOOP(r, n) {
    const int32_t* row = in + r * (1 + Ndim<kNdim>(g));
    uint64_t* row_keys = keys + r * per_row;
    int64_t count = 0;
    if (SiteInRange<kNdim>(g, row, g.in_shape)) {
      int64_t axis_table[kMaxAxisTable];
      AxisTargets<kNdim>(g, row + 1, axis_table);
      ForEachTap<kNdim>(g, row[0], axis_table, g.out_shape, [&](int64_t t, uint64_t key) {
        row_keys[count] = key;
        if (payload != nullptr) payload[r * per_row + count] = static_cast<uint32_t>(r * g.taps + t);
        ++count;
      });
    }
    for (; count < per_row; ++count) {
      row_keys[count] = sentinel;
      if (payload != nullptr) payload[r * per_row + count] = 0;
    }
  }
}

// flags[e] = 1 where sorted candidate e is the first of a key (the sentinel excluded).
__global__ void FirstOfKeyKernel(const uint64_t* __restrict__ keys, int64_t count, uint64_t sentinel,
                                 int32_t* __restrict__ flags) {
  JSPARSE_GRID_LOOP(e, count) {
    flags[e] = keys[e] != sentinel && (e == 0 || keys[e] != keys[e - 1]);
  }
}

// For sorted candidate e with output row o = rank[e] - 1 below the capacity: the first of its key
// writes the site's row; nbr and nbr_t (where given) get the pair.
__global__ void WriteMapKernel(MapGeometry g, const uint64_t* __restrict__ keys,
                               const uint32_t* __restrict__ payload, const int32_t* __restrict__ rank,
                               int64_t count, uint64_t sentinel, int64_t capacity, int32_t* __restrict__ out,
                               int32_t* __restrict__ nbr, int32_t* __restrict__ nbr_t) {
  JSPARSE_GRID_LOOP(e, count) {
    const uint64_t key = keys[e];
    if (key == sentinel) continue;
    const int64_t o = rank[e] - 1;
    if (o >= capacity) continue;
    if (e == 0 || keys[e - 1] != key) UnpackSite(key, g.out_shape, g.ndim, out + o * (1 + g.ndim));
    if (nbr == nullptr) continue;
    const int64_t i = payload[e] / g.taps;
    const int64_t t = payload[e] % g.taps;
    atomicMin(reinterpret_cast<unsigned int*>(nbr + o * g.taps + t), static_cast<unsigned int>(i));
    nbr_t[i * g.taps + t] = static_cast<int32_t>(o);
  }
}

// *num_out = the number of distinct keys: the last rank (0 without candidates).
__global__ void CountKernel(const int32_t* __restrict__ rank, int64_t count, int32_t* __restrict__ num_out) {
  *num_out = count > 0 ? rank[count - 1] : 0;
}

// Sorts the candidates of the map's input rows and ranks them; with nbr given (jsparse_kmap_build)
// also writes the pairs. Outputs: out [capacity, 1 + ndim], num_out, and optionally nbr
// [capacity, K] and nbr_t [n, K].
ffi::Error BuildFromCandidates(const std::string& op, cudaStream_t stream, ffi::ScratchAllocator& scratch,
                               const MapGeometry& g, const int32_t* in, int64_t n, int64_t capacity,
                               int32_t* out, int32_t* num_out, int32_t* nbr, int32_t* nbr_t) {
  if (AxisTableSize(g) > kMaxAxisTable) {
    return ffi::Error::InvalidArgument(op + "the kernel sizes may sum to at most " +
                                       std::to_string(kMaxAxisTable) + " over the axes on CUDA");
  }
  const int64_t per_row = MaxTargetsPerInput(g);
  const int64_t count = n * per_row;
  if (count >= (int64_t{1} << 31)) {
    return ffi::Error::InvalidArgument(op + "N_in x (taps that reach an output) = " + std::to_string(count) +
                                       " candidates; at most 2**31 - 1 fit one sort on CUDA");
  }
  uint64_t sentinel = static_cast<uint64_t>(g.batch_size);  // the output grid's sites: above every key
  for (int j = 0; j < g.ndim; ++j) sentinel *= static_cast<uint64_t>(g.out_shape[j]);
  const int end_bit = BitLength(sentinel);
  const bool pairs = nbr != nullptr;
  const int items = static_cast<int>(count);

  // cub's temporary storage, sized on the host without touching the device.
  size_t sort_bytes = 0, scan_bytes = 0;
  if (pairs) {
    cub::DoubleBuffer<uint64_t> k(nullptr, nullptr);
    cub::DoubleBuffer<uint32_t> v(nullptr, nullptr);
    cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, k, v, items, 0, end_bit, stream);
  } else {
    cub::DoubleBuffer<uint64_t> k(nullptr, nullptr);
    cub::DeviceRadixSort::SortKeys(nullptr, sort_bytes, k, items, 0, end_bit, stream);
  }
  cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<int32_t*>(nullptr),
                                static_cast<int32_t*>(nullptr), items, stream);

  uint64_t* keys = AllocateScratch<uint64_t>(scratch, count);
  uint64_t* keys_alt = AllocateScratch<uint64_t>(scratch, count);
  uint32_t* payload = pairs ? AllocateScratch<uint32_t>(scratch, count) : nullptr;
  uint32_t* payload_alt = pairs ? AllocateScratch<uint32_t>(scratch, count) : nullptr;
  int32_t* flags = AllocateScratch<int32_t>(scratch, count);
  int32_t* rank = AllocateScratch<int32_t>(scratch, count);
  std::byte* temp = AllocateScratch<std::byte>(scratch, static_cast<int64_t>(std::max(sort_bytes, scan_bytes)));
  if (!keys || !keys_alt || !flags || !rank || !temp || (pairs && (!payload || !payload_alt))) {
    return ScratchError(op, count * (pairs ? 32 : 24) + static_cast<int64_t>(std::max(sort_bytes, scan_bytes)));
  }

  SetMinusOne(stream, out, capacity * (1 + g.ndim));
  if (pairs) {
    SetMinusOne(stream, nbr, capacity * g.taps);
    SetMinusOne(stream, nbr_t, n * g.taps);
  }
  DispatchNdim(g.ndim, [&](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    CandidatesKernel<kNdim><<<BlocksFor(n), kThreads, 0, stream>>>(g, in, n, per_row, sentinel, keys, payload);
  });
  cub::DoubleBuffer<uint64_t> sorted_keys(keys, keys_alt);
  cub::DoubleBuffer<uint32_t> sorted_payload(payload, payload_alt);
  if (count > 0) {
    if (pairs) {
      cub::DeviceRadixSort::SortPairs(temp, sort_bytes, sorted_keys, sorted_payload, items, 0, end_bit, stream);
    } else {
      cub::DeviceRadixSort::SortKeys(temp, sort_bytes, sorted_keys, items, 0, end_bit, stream);
    }
    FirstOfKeyKernel<<<BlocksFor(count), kThreads, 0, stream>>>(sorted_keys.Current(), count, sentinel, flags);
    cub::DeviceScan::InclusiveSum(temp, scan_bytes, flags, rank, items, stream);
    WriteMapKernel<<<BlocksFor(count), kThreads, 0, stream>>>(
        g, sorted_keys.Current(), pairs ? sorted_payload.Current() : nullptr, rank, count, sentinel, capacity,
        out, nbr, nbr_t);
  }
  CountKernel<<<1, 1, 0, stream>>>(rank, count, num_out);
  return LaunchError(op);
}

ffi::Error OutputSitesImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer indices,
                           GeometryAttrs attrs, ffi::Result<ffi::AnyBuffer> out_indices,
                           ffi::Result<ffi::AnyBuffer> num_out) {
  MapGeometry g;
  const std::string message = ValidateOutputSites(indices, attrs, *out_indices, *num_out, &g);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  return BuildFromCandidates("jsparse_kmap_output_sites: ", stream, scratch, g, indices.typed_data<int32_t>(),
                             indices.dimensions()[0], out_indices->dimensions()[0],
                             out_indices->typed_data<int32_t>(), num_out->typed_data<int32_t>(), nullptr, nullptr);
}

ffi::Error BuildMapImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer indices,
                        GeometryAttrs attrs, ffi::Result<ffi::AnyBuffer> out_indices,
                        ffi::Result<ffi::AnyBuffer> num_out, ffi::Result<ffi::AnyBuffer> nbr,
                        ffi::Result<ffi::AnyBuffer> nbr_t) {
  MapGeometry g;
  const std::string message = ValidateBuildMap(indices, attrs, *out_indices, *num_out, *nbr, *nbr_t, &g);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  return BuildFromCandidates("jsparse_kmap_build: ", stream, scratch, g, indices.typed_data<int32_t>(),
                             indices.dimensions()[0], out_indices->dimensions()[0],
                             out_indices->typed_data<int32_t>(), num_out->typed_data<int32_t>(),
                             nbr->typed_data<int32_t>(), nbr_t->typed_data<int32_t>());
}

// ---- jsparse_kmap_neighbors ----

// An open-addressing table of packed site keys -> smallest row (common/hash.h's slots).
struct SiteTable {
  uint64_t* keys;
  int32_t* rows;
  uint64_t mask;

  __device__ void Insert(uint64_t key, int32_t row) const {
    for (uint64_t slot = SiteSlot(key, mask);; slot = (slot + 1) & mask) {
      const unsigned long long seen = atomicCAS(reinterpret_cast<unsigned long long*>(keys + slot),
                                                static_cast<unsigned long long>(kEmptyKey),
                                                static_cast<unsigned long long>(key));
      if (seen == kEmptyKey || seen == key) {
        atomicMin(reinterpret_cast<unsigned int*>(rows + slot), static_cast<unsigned int>(row));
        return;
      }
    }
  }

  __device__ int32_t Find(uint64_t key) const {
    for (uint64_t slot = SiteSlot(key, mask);; slot = (slot + 1) & mask) {
      const uint64_t seen = keys[slot];
      if (seen == key) return rows[slot];
      if (seen == kEmptyKey) return -1;
    }
  }
};

// Packs row's site over `shape`; false when the row is not an active site of it.
template <int kNdim>
__device__ bool PackRow(const MapGeometry& g, const int32_t* row, const int64_t* shape, uint64_t* key) {
  if (!SiteInRange<kNdim>(g, row, shape)) return false;
  uint64_t packed = static_cast<uint64_t>(row[0]);
  for (int j = 0; j < Ndim<kNdim>(g); ++j) packed = packed * static_cast<uint64_t>(shape[j]) + row[1 + j];
  *key = packed;
  return true;
}

template <int kNdim>
__global__ void InsertSitesKernel(MapGeometry g, const int32_t* __restrict__ sites, int64_t n, bool outputs,
                                  SiteTable table) {
  JSPARSE_GRID_LOOP(r, n) {
    uint64_t key;
    if (PackRow<kNdim>(g, sites + r * (1 + Ndim<kNdim>(g)), outputs ? g.out_shape : g.in_shape, &key)) {
      table.Insert(key, static_cast<int32_t>(r));
    }
  }
}

// Along one axis: the coordinate that `from` reaches through tap index t, or -1 if none. `divide`:
// the tap solves from + pad - t * d = to * s for `to` (exact, non-negative); else to = from * s -
// pad + t * d. Either way the result must lie in [0, limit).
__device__ __forceinline__ int64_t TapCoordinate(int64_t from, int64_t t, int64_t s, int64_t pad, int64_t d,
                                                 int64_t limit, bool divide) {
  int64_t to;
  if (divide) {
    const int64_t numerator = from + pad - t * d;
    if (numerator < 0 || numerator % s != 0) return -1;
    to = numerator / s;
  } else {
    to = from * s - pad + t * d;
  }
  return to >= 0 && to < limit ? to : -1;
}

// Packed key of the site that `row` reaches through tap `tap` (row-major over the kernel), or
// false. `sources`: output row -> the input it reads (AxisSources); else input row -> the output
// it feeds (AxisTargets).
template <int kNdim>
__device__ bool TapKey(const MapGeometry& g, const int32_t* row, int64_t tap, bool sources, uint64_t* key) {
  const int ndim = Ndim<kNdim>(g);
  const int64_t* shape = sources ? g.in_shape : g.out_shape;
  const bool divide = sources == static_cast<bool>(g.transpose);
  int64_t coords[kMaxMapNdim];
  for (int j = ndim - 1; j >= 0; --j) {  // tap index along axis j: row-major digits of `tap`
    const int64_t t = tap % g.kernel[j];
    tap /= g.kernel[j];
    coords[j] = TapCoordinate(row[1 + j], t, g.stride[j], g.padding[j], g.dilation[j], shape[j], divide);
    if (coords[j] < 0) return false;
  }
  *key = PackSite(row[0], coords, shape, ndim);
  return true;
}

// nbr[o, k] = the input row holding the site that output o reads through tap k (a table of the inputs).
template <int kNdim>
__global__ void GatherNeighborsKernel(MapGeometry g, const int32_t* __restrict__ out, int64_t n_out,
                                      SiteTable inputs, int32_t* __restrict__ nbr) {
  JSPARSE_GRID_LOOP(e, n_out * g.taps) {
    const int64_t o = e / g.taps;
    const int32_t* row = out + o * (1 + Ndim<kNdim>(g));
    uint64_t key;
    int32_t found = -1;
    if (SiteInRange<kNdim>(g, row, g.out_shape) && TapKey<kNdim>(g, row, e % g.taps, true, &key)) {
      found = inputs.Find(key);
    }
    nbr[e] = found;
  }
}

// For input i and tap k reaching output o (a table of the outputs): nbr_t[i, k] = o and nbr[o, k] =
// the smallest such i.
template <int kNdim>
__global__ void ScatterNeighborsKernel(MapGeometry g, const int32_t* __restrict__ in, int64_t n_in,
                                       SiteTable outputs, int32_t* __restrict__ nbr, int32_t* __restrict__ nbr_t) {
  JSPARSE_GRID_LOOP(e, n_in * g.taps) {
    const int64_t i = e / g.taps;
    const int64_t k = e % g.taps;
    const int32_t* row = in + i * (1 + Ndim<kNdim>(g));
    uint64_t key;
    if (!SiteInRange<kNdim>(g, row, g.in_shape) || !TapKey<kNdim>(g, row, k, false, &key)) continue;
    const int32_t o = outputs.Find(key);
    if (o < 0) continue;
    atomicMin(reinterpret_cast<unsigned int*>(nbr + int64_t{o} * g.taps + k), static_cast<unsigned int>(i));
    if (nbr_t != nullptr) nbr_t[e] = o;
  }
}

ffi::Error NeighborsImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer in_indices,
                         ffi::AnyBuffer out_indices, GeometryAttrs attrs, bool symmetric,
                         ffi::Result<ffi::AnyBuffer> nbr, ffi::Result<ffi::AnyBuffer> nbr_t) {
  const std::string op = "jsparse_kmap_neighbors: ";
  MapGeometry g;
  const std::string message = ValidateNeighbors(in_indices, out_indices, attrs, symmetric, *nbr, *nbr_t, &g);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  const int64_t n_in = in_indices.dimensions()[0];
  const int64_t n_out = out_indices.dimensions()[0];
  const bool with_transpose = nbr_t->dimensions()[0] == n_in && n_in > 0;
  const int32_t* in = in_indices.typed_data<int32_t>();
  const int32_t* out = out_indices.typed_data<int32_t>();
  int32_t* forward = nbr->typed_data<int32_t>();
  int32_t* backward = with_transpose ? nbr_t->typed_data<int32_t>() : nullptr;

  // Symmetric maps hash the inputs and gather; the others hash the outputs and scatter.
  const int64_t table_rows = symmetric ? n_in : n_out;
  const int64_t slots = TableSlots(table_rows);
  SiteTable table{AllocateScratch<uint64_t>(scratch, slots), AllocateScratch<int32_t>(scratch, slots),
                  static_cast<uint64_t>(slots - 1)};
  if (!table.keys || !table.rows) return ScratchError(op, slots * 12);
  cudaMemsetAsync(table.keys, 0xFF, slots * sizeof(uint64_t), stream);  // kEmptyKey
  SetMinusOne(stream, table.rows, slots);
  if (!symmetric) {
    SetMinusOne(stream, forward, n_out * g.taps);
    if (backward != nullptr) SetMinusOne(stream, backward, n_in * g.taps);
  }
  DispatchNdim(g.ndim, [&](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    if (symmetric) {
      InsertSitesKernel<kNdim><<<BlocksFor(n_in), kThreads, 0, stream>>>(g, in, n_in, false, table);
      GatherNeighborsKernel<kNdim><<<BlocksFor(n_out * g.taps), kThreads, 0, stream>>>(g, out, n_out, table,
                                                                                       forward);
    } else {
      InsertSitesKernel<kNdim><<<BlocksFor(n_out), kThreads, 0, stream>>>(g, out, n_out, true, table);
      ScatterNeighborsKernel<kNdim><<<BlocksFor(n_in * g.taps), kThreads, 0, stream>>>(g, in, n_in, table,
                                                                                       forward, backward);
    }
  });
  return LaunchError(op);
}

// Entry points: the geometry attributes gathered into GeometryAttrs.
ffi::Error OutputSitesEntry(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer indices,
                            ffi::Span<const int64_t> k, ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
                            ffi::Span<const int64_t> d, ffi::Span<const int64_t> in_shape,
                            ffi::Span<const int64_t> out_shape, int64_t transpose, int64_t batch_size,
                            ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> num_out) {
  return OutputSitesImpl(stream, std::move(scratch), indices,
                         {k, s, p, d, in_shape, out_shape, transpose, batch_size}, out_indices, num_out);
}

ffi::Error BuildMapEntry(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer indices,
                         ffi::Span<const int64_t> k, ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
                         ffi::Span<const int64_t> d, ffi::Span<const int64_t> in_shape,
                         ffi::Span<const int64_t> out_shape, int64_t transpose, int64_t batch_size,
                         ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> num_out,
                         ffi::Result<ffi::AnyBuffer> nbr, ffi::Result<ffi::AnyBuffer> nbr_t) {
  return BuildMapImpl(stream, std::move(scratch), indices, {k, s, p, d, in_shape, out_shape, transpose, batch_size},
                      out_indices, num_out, nbr, nbr_t);
}

ffi::Error NeighborsEntry(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer in_indices,
                          ffi::AnyBuffer out_indices, ffi::Span<const int64_t> k, ffi::Span<const int64_t> s,
                          ffi::Span<const int64_t> p, ffi::Span<const int64_t> d,
                          ffi::Span<const int64_t> in_shape, ffi::Span<const int64_t> out_shape,
                          int64_t transpose, int64_t batch_size, int64_t symmetric,
                          ffi::Result<ffi::AnyBuffer> nbr, ffi::Result<ffi::AnyBuffer> nbr_t) {
  return NeighborsImpl(stream, std::move(scratch), in_indices, out_indices,
                       {k, s, p, d, in_shape, out_shape, transpose, batch_size}, symmetric != 0, nbr, nbr_t);
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapOutputSitesCuda, jsparse::OutputSitesEntry,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()
        JSPARSE_KMAP_OUTPUT_SITES_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapNeighborsCuda, jsparse::NeighborsEntry,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()
        JSPARSE_KMAP_NEIGHBORS_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapBuildCuda, jsparse::BuildMapEntry,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::ScratchAllocator>()
        JSPARSE_KMAP_BUILD_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_output_sites", JsparseKmapOutputSitesCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_build", JsparseKmapBuildCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_neighbors", JsparseKmapNeighborsCuda);
