// Sparse convolution on CPU: fused gather-GEMM-scatter over a kernel map (jsparse.ops.sparse_conv).
//
// jsparse_conv_gather_gemm: out[o] = sum_k features[nbr[o, k]] @ kernel[k] (per group), used for
//   the forward pass and, with the transposed map and kernel, for the input gradient (for odd
//   submanifold maps the transposed map is nbr read with reversed taps). Each task
//   owns a tile of output rows and accumulates them in float32 over the taps in order, so no two
//   threads write the same row and results do not depend on the thread count.
// jsparse_conv_weight_grad: d_kernel[k] = sum_o features[nbr[o, k]]^T d_out[o] (per group). Each
//   task sums the pairs of a fixed range of output rows into its own float32 partials, which are
//   then added in a fixed tree over the ranges, again independent of scheduling.
// Neither materializes [N, K, C]: a task gathers kGemmRows rows at a time.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/registry.h"
#include "features.h"
#include "float_convert.h"
#include "gemm.h"
#include "errors.h"
#include "memory.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

// The channel layout shared by both handlers: C_in = groups * a, C_out = groups * b.
struct ConvDims {
  int64_t n_in, n_out, taps, groups, a, b;
  int64_t c_in() const { return groups * a; }
  int64_t c_out() const { return groups * b; }
};

// Checks features [N_in, C_in], kernel-shaped [K, a, G * b] and nbr int32 [N_out, K]; fills dims.
std::string ValidateConvArgs(const std::string& op, const ffi::AnyBuffer& features,
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

// float32 [taps][groups][a][b_pad]: each group's slice of each tap, columns zero-padded.
template <typename T>
std::vector<float> PackKernel(const T* kernel, const ConvDims& d, int64_t b_pad) {
  std::vector<float> packed(d.taps * d.groups * d.a * b_pad, 0.0f);
  for (int64_t k = 0; k < d.taps; ++k) {
    for (int64_t g = 0; g < d.groups; ++g) {
      float* dst = packed.data() + (k * d.groups + g) * d.a * b_pad;
      for (int64_t i = 0; i < d.a; ++i) {
        const T* src = kernel + (k * d.a + i) * d.c_out() + g * d.b;
        for (int64_t j = 0; j < d.b; ++j) dst[i * b_pad + j] = ToFloat(src[j]);
      }
    }
  }
  return packed;
}

// The pairs of nbr rows [0, rows) (nbr points at the first row), grouped by tap: for tap k,
// entries tap_start[k] .. tap_start[k + 1] - 1 of `rows` and `inputs` hold the row (relative to
// the first) and the input row it reads, in row order. Tap k reads nbr column tap_column(k), an
// involution (the identity, or K - 1 - k for a transposed odd submanifold map).
struct PairsByTap {
  std::vector<int64_t> tap_start;
  std::unique_ptr<int32_t[]> rows, inputs;
};

template <typename TapColumn>
PairsByTap GroupPairsByTap(const int32_t* nbr, int64_t rows, int64_t taps, int64_t n_in, TapColumn tap_column) {
  // Sparse maps leave most nbr cells empty: one branch-free row-major pass collects the valid
  // cells (reading nbr column by column would touch every cache line once per tap), then a
  // counting sort orders those few by tap. Scratch is left uninitialized: it is megabytes per
  // call, and every entry read is written first.
  const int64_t cells = rows * taps;
  std::unique_ptr<int32_t[]> cell_rows(new int32_t[cells + 1]), cell_taps(new int32_t[cells + 1]);
  int64_t num_valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < taps; ++c) {
      cell_rows[num_valid] = static_cast<int32_t>(r);
      cell_taps[num_valid] = static_cast<int32_t>(tap_column(c));
      num_valid += static_cast<uint32_t>(nbr[r * taps + c]) < static_cast<uint64_t>(n_in);  // -1 wraps
    }
  }
  PairsByTap pairs{std::vector<int64_t>(taps + 1, 0), std::unique_ptr<int32_t[]>(new int32_t[num_valid]),
                   std::unique_ptr<int32_t[]>(new int32_t[num_valid])};
  for (int64_t v = 0; v < num_valid; ++v) ++pairs.tap_start[cell_taps[v] + 1];
  for (int64_t k = 0; k < taps; ++k) pairs.tap_start[k + 1] += pairs.tap_start[k];
  std::vector<int64_t> cursor(pairs.tap_start.begin(), pairs.tap_start.end() - 1);
  for (int64_t v = 0; v < num_valid; ++v) {
    const int64_t k = cell_taps[v], r = cell_rows[v];
    const int64_t slot = cursor[k]++;
    pairs.rows[slot] = static_cast<int32_t>(r);
    pairs.inputs[slot] = nbr[r * taps + tap_column(k)];
  }
  return pairs;
}

// ---- jsparse_conv_gather_gemm ----

template <typename T>
ffi::Future GatherGemm(ffi::ThreadPool& pool, const T* features, const T* kernel, const int32_t* nbr,
                       bool reverse_taps, const ConvDims& d, T* out) {
  // Tap k reads column k of nbr, or column K - 1 - k (the transpose of an odd submanifold map).
  auto tap_column = [=](int64_t k) { return reverse_taps ? d.taps - 1 - k : k; };
  const int64_t b_pad = RoundUp(d.b, GemmLanes());
  const int64_t ldc = d.groups * b_pad;
  // Tiles of about 256 KiB of float32 accumulators (1024 rows at 64 channels; they stay in L2):
  // a sparse map has only a few pairs per tap in each row, and large tiles keep the kGemmRows
  // blocks full and the per-tile work (grouping pairs, clearing, converting) small. At least 4
  // tiles per thread keep small layers parallel; tiling never changes a row's sums.
  const int64_t by_size = std::clamp<int64_t>(RoundUp(65536 / ldc, kGemmRows), 64, 2048);
  const int64_t min_tiles = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t by_threads = RoundUp((d.n_out + min_tiles - 1) / min_tiles, kGemmRows);
  const int64_t tile = std::max<int64_t>(kGemmRows, std::min(by_size, by_threads));
  const int64_t num_tiles = (d.n_out + tile - 1) / tile;
  auto packed = std::make_shared<std::vector<float>>(PackKernel(kernel, d, b_pad));
  // float32 rows are read where they are, and summed in the output's own rows when those need
  // no column padding; other dtypes go through float32 copies of both.
  constexpr bool kFloat = std::is_same_v<T, float>;
  const bool sum_in_out = kFloat && ldc == d.c_out();
  auto body = [=](int64_t task) {
    const int64_t first = task * tile;
    const int64_t rows = std::min(tile, d.n_out - first);
    std::vector<float> tile_sums(sum_in_out ? 0 : rows * ldc, 0.0f);
    float* sums = sum_in_out ? reinterpret_cast<float*>(out) + first * ldc : tile_sums.data();
    if (sum_in_out) std::fill_n(sums, rows * ldc, 0.0f);
    std::vector<float> spare(ldc);  // the C row of a block's unused rows
    std::vector<float> a(kFloat ? d.c_in() : kGemmRows * d.c_in(), 0.0f);  // float32 copies, or one zero row
    const float* a_rows[kGemmRows];
    float* c_rows[kGemmRows];
    const PairsByTap pairs = GroupPairsByTap(nbr + first * d.taps, rows, d.taps, d.n_in, tap_column);
    for (int64_t k = 0; k < d.taps; ++k) {
      const int64_t count = pairs.tap_start[k + 1] - pairs.tap_start[k];
      const int32_t* valid = pairs.rows.get() + pairs.tap_start[k];  // tile rows with an input at tap k
      const int32_t* inputs = pairs.inputs.get() + pairs.tap_start[k];
      // Gathered rows are scattered over the features: prefetch a few blocks ahead so that their
      // cache misses overlap with the multiplications.
      constexpr int64_t kPrefetchAhead = 2 * kGemmRows;
      auto input_row = [&](int64_t e) { return features + int64_t{inputs[e]} * d.c_in(); };
      for (int64_t e = 0; e < std::min(count, kPrefetchAhead); ++e) __builtin_prefetch(input_row(e));
      for (int64_t begin = 0; begin < count; begin += kGemmRows) {
        const int filled = static_cast<int>(std::min<int64_t>(kGemmRows, count - begin));
        for (int64_t e = begin + kPrefetchAhead; e < std::min(count, begin + kPrefetchAhead + kGemmRows); ++e) {
          __builtin_prefetch(input_row(e));
        }
        for (int r = 0; r < kGemmRows; ++r) {
          if (r < filled) {
            if constexpr (kFloat) {
              a_rows[r] = input_row(begin + r);
            } else {
              ToFloatRow(input_row(begin + r), d.c_in(), a.data() + r * d.c_in());
            }
            c_rows[r] = sums + valid[begin + r] * ldc;
          } else {
            if constexpr (kFloat) {
              a_rows[r] = a.data();
            } else {
              std::fill_n(a.data() + r * d.c_in(), d.c_in(), 0.0f);
            }
            c_rows[r] = spare.data();
          }
        }
        for (int64_t g = 0; g < d.groups; ++g) {
          const float* w = packed->data() + (k * d.groups + g) * d.a * b_pad;
          if constexpr (kFloat) {
            GemmRowPointers(a_rows, g * d.a, d.a, w, b_pad, b_pad, c_rows, g * b_pad);
          } else {
            GemmRows(a.data() + g * d.a, d.c_in(), 1, d.a, w, b_pad, b_pad, c_rows, g * b_pad);
          }
        }
      }
    }
    if (sum_in_out) return;
    for (int64_t r = 0; r < rows; ++r) {
      T* dst = out + (first + r) * d.c_out();
      for (int64_t g = 0; g < d.groups; ++g) FromFloatRow(sums + r * ldc + g * b_pad, d.b, dst + g * d.b);
    }
  };
  return ParallelFor(pool, num_tiles, body);
}

ffi::Future GatherGemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer kernel,
                           ffi::AnyBuffer nbr, int64_t groups, int64_t reverse_taps,
                           ffi::Result<ffi::AnyBuffer> out) {
  const std::string op = "jsparse_conv_gather_gemm: ";
  ConvDims d;
  std::string message = ValidateConvArgs(op, features, kernel.dimensions(), kernel.element_type(),
                                         nbr, groups, &d);
  const auto out_dims = out->dimensions();
  if (message.empty() && (out->element_type() != features.element_type() || out_dims.size() != 2 ||
                          out_dims[0] != d.n_out || out_dims[1] != d.c_out())) {
    message = op + "the output must be [N_out, C_out] = [" + std::to_string(d.n_out) + ", " +
              std::to_string(d.c_out()) + "] in the features' dtype";
  }
  if (!message.empty()) return InvalidArgumentFuture(message);
  AdviseHugePages(out->untyped_data(), out->size_bytes());
  return DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return GatherGemm(pool, static_cast<const T*>(features.untyped_data()),
                      static_cast<const T*>(kernel.untyped_data()), nbr.typed_data<int32_t>(),
                      reverse_taps != 0, d, static_cast<T*>(out->untyped_data()));
  });
}

// ---- jsparse_conv_weight_grad ----

template <typename T>
ffi::Future WeightGrad(ffi::ThreadPool& pool, const T* features, const T* d_out, const int32_t* nbr,
                       const ConvDims& d, T* d_kernel) {
  const int64_t b_pad = RoundUp(d.b, GemmLanes());
  const int64_t a_pad = RoundUp(d.a, kGemmRows);
  const int64_t ldc = d.groups * b_pad;
  // Output rows are cut into at most 16 ranges (a function of N only, never of the thread
  // count); each range's task sums its pairs per tap into its own float32 partials.
  const int64_t range = std::max<int64_t>(4096, (d.n_out + 15) / 16);
  const int64_t num_ranges = (d.n_out + range - 1) / range;
  const int64_t partial_size = a_pad * ldc;
  // float32 rows whose channel blocks fill whole micro-kernel blocks are read in place.
  const bool in_place = std::is_same_v<T, float> && d.a % kGemmRows == 0 && d.b % GemmLanes() == 0;
  // Left uninitialized: a task clears the partials it uses (most (range, tap) pairs of a large
  // map are used, and clearing them all up front would be a serial pass over megabytes).
  std::shared_ptr<float[]> partials(new float[num_ranges * d.taps * partial_size]);
  auto used = std::make_shared<std::vector<char>>(num_ranges * d.taps, 0);
  // The partials are summed in a fixed binary tree over the ranges: node j of level L covers
  // ranges [j << L, (j + 1) << L) and keeps its sum in the partials of range j << L, so the order
  // of the additions never depends on scheduling. A node is summed by the task that finishes the
  // second of its two children: no task waits, and the sums of different nodes run in parallel.
  // (Waiting for other tasks would hold a worker that XLA may need for the input gradient's call,
  // which it can run beside this one on the same pool.)
  int64_t levels = 0;
  while ((int64_t{1} << levels) < num_ranges) ++levels;
  std::shared_ptr<std::atomic<int>[]> arrivals(new std::atomic<int>[std::max<int64_t>(1, levels * num_ranges)]());
  // Range `from`'s partials added into range `into`'s, tap by tap.
  auto add_partials = [=](int64_t into, int64_t from) {
    for (int64_t k = 0; k < d.taps; ++k) {
      if (!(*used)[from * d.taps + k]) continue;
      float* dst = partials.get() + (into * d.taps + k) * partial_size;
      const float* src = partials.get() + (from * d.taps + k) * partial_size;
      if ((*used)[into * d.taps + k]) {
        for (int64_t e = 0; e < partial_size; ++e) dst[e] += src[e];
      } else {
        std::copy_n(src, partial_size, dst);
        (*used)[into * d.taps + k] = 1;
      }
    }
  };
  // Called by each range's task when its partials are complete: sums every node whose second
  // child this completes, from the leaf up.
  auto climb = [=](int64_t leaf) {
    for (int64_t level = 0, node = leaf; level < levels; ++level, node >>= 1) {
      const int64_t left = node & ~int64_t{1};
      if (((left + 1) << level) >= num_ranges) continue;  // no right sibling: the sum is the left's
      // acq_rel: the second child's task sees every write of the first child's subtree.
      if (arrivals[level * num_ranges + (node >> 1)].fetch_add(1, std::memory_order_acq_rel) == 0) return;
      add_partials(left << level, (left + 1) << level);
    }
  };
  auto body = [=](int64_t task) {
    const int64_t first = task * range;
    const int64_t last = std::min(d.n_out, first + range);
    // (output row, input row) pairs of each tap within the range, in output-row order.
    const PairsByTap pairs = GroupPairsByTap(nbr + first * d.taps, last - first, d.taps, d.n_in,
                                             [](int64_t k) { return k; });
    constexpr int64_t kChunk = 256;  // pairs gathered at a time
    std::vector<const float*> x_rows(kChunk), y_rows(kChunk);
    std::vector<float> x(kChunk * d.c_in());
    std::vector<float> dy(kChunk * ldc, 0.0f);
    std::vector<float> tail(kGemmRows * kChunk);  // the last channel block, zero-padded
    float* c_rows[kGemmRows];
    for (int64_t k = 0; k < d.taps; ++k) {
      const int64_t count = pairs.tap_start[k + 1] - pairs.tap_start[k];
      const int32_t* outputs = pairs.rows.get() + pairs.tap_start[k];  // relative to `first`
      const int32_t* inputs = pairs.inputs.get() + pairs.tap_start[k];
      if (count == 0) continue;
      (*used)[task * d.taps + k] = 1;
      float* partial = partials.get() + (task * d.taps + k) * partial_size;
      std::fill_n(partial, partial_size, 0.0f);
      if (in_place) {  // float32 rows read where they are: no gathering copies
        for (int64_t begin = 0; begin < count; begin += kChunk) {
          const int64_t len = std::min<int64_t>(kChunk, count - begin);
          for (int64_t g = 0; g < d.groups; ++g) {
            for (int64_t p = 0; p < len; ++p) {
              const int64_t o = first + outputs[begin + p], i = inputs[begin + p];
              x_rows[p] = reinterpret_cast<const float*>(features) + i * d.c_in() + g * d.a;
              y_rows[p] = reinterpret_cast<const float*>(d_out) + o * d.c_out() + g * d.b;
            }
            for (int64_t r0 = 0; r0 < d.a; r0 += kGemmRows) {
              for (int r = 0; r < kGemmRows; ++r) c_rows[r] = partial + (r0 + r) * ldc;
              GemmRowsGathered(x_rows.data(), r0, y_rows.data(), len, b_pad, c_rows, g * b_pad);
            }
          }
        }
        continue;
      }
      for (int64_t begin = 0; begin < count; begin += kChunk) {
        const int64_t len = std::min<int64_t>(kChunk, count - begin);
        for (int64_t p = 0; p < len; ++p) {
          if (begin + p + 16 < count) {  // the gathered rows are scattered: prefetch ahead
            __builtin_prefetch(features + int64_t{inputs[begin + p + 16]} * d.c_in());
            __builtin_prefetch(d_out + (first + outputs[begin + p + 16]) * d.c_out());
          }
          const int64_t o = first + outputs[begin + p], i = inputs[begin + p];
          const T* xs = features + i * d.c_in();
          ToFloatRow(xs, d.c_in(), x.data() + p * d.c_in());
          const T* ys = d_out + o * d.c_out();
          for (int64_t g = 0; g < d.groups; ++g) {
            ToFloatRow(ys + g * d.b, d.b, dy.data() + p * ldc + g * b_pad);
          }
        }
        for (int64_t g = 0; g < d.groups; ++g) {
          for (int64_t r0 = 0; r0 < a_pad; r0 += kGemmRows) {
            // Rows of A are input channels g * a + r; channels past `a` read a zero column.
            for (int r = 0; r < kGemmRows; ++r) c_rows[r] = partial + (r0 + r) * ldc;
            if (r0 + kGemmRows <= d.a) {
              GemmRows(x.data() + g * d.a + r0, 1, d.c_in(), len, dy.data() + g * b_pad, ldc, b_pad,
                       c_rows, g * b_pad);
            } else {
              std::fill(tail.begin(), tail.end(), 0.0f);  // [kGemmRows, len]
              for (int64_t r = 0; r0 + r < d.a; ++r) {
                for (int64_t p = 0; p < len; ++p) tail[r * len + p] = x[p * d.c_in() + g * d.a + r0 + r];
              }
              GemmRows(tail.data(), len, 1, len, dy.data() + g * b_pad, ldc, b_pad, c_rows, g * b_pad);
            }
          }
        }
      }
    }
    climb(task);
  };
  auto finish = [=]() {  // d_kernel[k]: the root's partial of tap k (range 0's), or 0
    for (int64_t k = 0; k < d.taps; ++k) {
      const bool any = num_ranges > 0 && (*used)[k];
      const float* sum = partials.get() + k * partial_size;
      for (int64_t c = 0; c < d.a; ++c) {
        T* dst = d_kernel + (k * d.a + c) * d.c_out();
        for (int64_t g = 0; g < d.groups; ++g) {
          for (int64_t j = 0; j < d.b; ++j) dst[g * d.b + j] = FromFloat<T>(any ? sum[c * ldc + g * b_pad + j] : 0.0f);
        }
      }
    }
  };
  return ParallelFor(pool, num_ranges, body, finish);
}

ffi::Future WeightGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer d_out,
                           ffi::AnyBuffer nbr, int64_t groups, ffi::Result<ffi::AnyBuffer> d_kernel) {
  const std::string op = "jsparse_conv_weight_grad: ";
  ConvDims d;
  std::string message = ValidateConvArgs(op, features, d_kernel->dimensions(),
                                         d_kernel->element_type(), nbr, groups, &d);
  const auto y = d_out.dimensions();
  if (message.empty() && (d_out.element_type() != features.element_type() || y.size() != 2 ||
                          y[0] != d.n_out || y[1] != d.c_out())) {
    message = op + "d_out must be [N_out, C_out] = [" + std::to_string(d.n_out) + ", " +
              std::to_string(d.c_out()) + "] in the features' dtype, got shape " + Shape(y);
  }
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return WeightGrad(pool, static_cast<const T*>(features.untyped_data()),
                      static_cast<const T*>(d_out.untyped_data()), nbr.typed_data<int32_t>(), d,
                      static_cast<T*>(d_kernel->untyped_data()));
  });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvGatherGemmCpu, jsparse::GatherGemmImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()       // features [N_in, C_in]
        .Arg<ffi::AnyBuffer>()       // kernel [K, C_in // groups, C_out]
        .Arg<ffi::AnyBuffer>()       // nbr int32 [N_out, K]
        .Attr<int64_t>("groups")     // channel groups
        .Attr<int64_t>("reverse_taps")  // 1: tap k reads nbr[:, K - 1 - k]
        .Ret<ffi::AnyBuffer>());     // out [N_out, C_out]

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvWeightGradCpu, jsparse::WeightGradImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()
        .Arg<ffi::AnyBuffer>()       // features [N_in, C_in]
        .Arg<ffi::AnyBuffer>()       // d_out [N_out, C_out]
        .Arg<ffi::AnyBuffer>()       // nbr int32 [N_out, K]
        .Attr<int64_t>("groups")     // channel groups
        .Ret<ffi::AnyBuffer>());     // d_kernel [K, C_in // groups, C_out]

JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_gather_gemm", JsparseConvGatherGemmCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_weight_grad", JsparseConvWeightGradCpu);
