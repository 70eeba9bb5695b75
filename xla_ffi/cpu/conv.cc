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
// jsparse_conv_backward_symmetric: both gradients over an odd submanifold map; for float32 channel
//   blocks that fill the micro-kernel's, in one pass that shares the pairs and the gathered d_out
//   rows (the kernel gradient's sums then taken in input-row order), else the two kernels above.
// None materializes [N, K, C]: a task gathers kGemmRows rows at a time.
#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "../common/conv_args.h"
#include "../common/registry.h"
#include "features.h"
#include "float_convert.h"
#include "gemm.h"
#include "errors.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

// One parallel phase of a handler: body(task) for every task in [0, count), then finish().
struct Tasks {
  int64_t count;
  std::function<void(int64_t)> body;
  std::function<void()> finish;
};

// Runs phases side by side in one ParallelFor (their tasks write disjoint outputs).
template <typename... Phases>
ffi::Future RunTasks(ffi::ThreadPool& pool, Phases... phases) {
  const std::array<Tasks, sizeof...(Phases)> all{std::move(phases)...};
  int64_t total = 0;
  for (const Tasks& p : all) total += p.count;
  return ParallelFor(
      pool, total,
      [all](int64_t task) {
        for (const Tasks& p : all) {
          if (task < p.count) return p.body(task);
          task -= p.count;
        }
      },
      [all]() {
        for (const Tasks& p : all) p.finish();
      });
}

// Whether each group's channel blocks fill whole micro-kernel blocks (a multiple of kGemmRows input
// and of GemmLanes() output channels), so that float32 rows can be read in place as GEMM operands.
bool FillsGemmBlocks(const ConvDims& d) { return d.a % kGemmRows == 0 && d.b % GemmLanes() == 0; }

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

// Output tiles of about 256 KiB of float32 sums (1024 rows at 64 channels; they stay in L2): a
// sparse map has only a few pairs per tap in each row, and large tiles keep the kGemmRows blocks
// full and the per-tile work (grouping pairs, clearing, converting) small.
int64_t TileRowsBySize(int64_t ldc) { return std::clamp<int64_t>(RoundUp(65536 / ldc, kGemmRows), 64, 2048); }

// Float32 sums for output rows [first, first + rows) of out [N_out, C_out]: the output's own rows
// for float32 rows without column padding (ldc == C_out), else a float32 tile that Store()
// converts into the output.
template <typename T>
class RowSums {
 public:
  RowSums(T* out, int64_t first, int64_t rows, const ConvDims& d, int64_t b_pad)
      : out_(out), first_(first), rows_(rows), d_(d), b_pad_(b_pad), ldc_(d.groups * b_pad) {
    if (std::is_same_v<T, float> && ldc_ == d.c_out()) {
      sums_ = reinterpret_cast<float*>(out) + first * ldc_;
      std::fill_n(sums_, rows * ldc_, 0.0f);
    } else {
      tile_.assign(rows * ldc_, 0.0f);
      sums_ = tile_.data();
    }
  }
  float* data() const { return sums_; }
  void Store() const {
    if (tile_.empty()) return;
    for (int64_t r = 0; r < rows_; ++r) {
      T* dst = out_ + (first_ + r) * d_.c_out();
      for (int64_t g = 0; g < d_.groups; ++g) FromFloatRow(sums_ + r * ldc_ + g * b_pad_, d_.b, dst + g * d_.b);
    }
  }

 private:
  T* out_;
  int64_t first_, rows_;
  ConvDims d_;
  int64_t b_pad_, ldc_;
  std::vector<float> tile_;
  float* sums_;
};

// Adds sum_k features[nbr[o, tap_column(k)]] @ w_k to sums row o - first for output rows
// [first, first + rows), tap by tap (w packed [taps][groups][a][b_pad], sums rows ldc = groups *
// b_pad apart). After each tap, on_tap(k, count, rows, inputs) sees that tap's pairs: output rows
// (relative to first, increasing) and the input rows they read.
template <typename T, typename TapColumn, typename OnTap>
void GatherGemmRows(const T* features, const float* packed, const int32_t* nbr, TapColumn tap_column,
                    const ConvDims& d, int64_t b_pad, int64_t first, int64_t rows, float* sums, OnTap on_tap) {
  const int64_t ldc = d.groups * b_pad;
  // float32 rows are read where they are; other dtypes go through float32 copies.
  constexpr bool kFloat = std::is_same_v<T, float>;
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
        const float* w = packed + (k * d.groups + g) * d.a * b_pad;
        if constexpr (kFloat) {
          GemmRowPointers(a_rows, g * d.a, d.a, w, b_pad, b_pad, c_rows, g * b_pad);
        } else {
          GemmRows(a.data() + g * d.a, d.c_in(), 1, d.a, w, b_pad, b_pad, c_rows, g * b_pad);
        }
      }
    }
    on_tap(k, count, valid, inputs);
  }
}

template <typename T>
Tasks GatherGemmTasks(int64_t threads, const T* features, const T* kernel, const int32_t* nbr, bool reverse_taps,
                      const ConvDims& d, T* out) {
  // Tap k reads column k of nbr, or column K - 1 - k (the transpose of an odd submanifold map).
  auto tap_column = [=](int64_t k) { return reverse_taps ? d.taps - 1 - k : k; };
  const int64_t b_pad = RoundUp(d.b, GemmLanes());
  // At least 4 tiles per thread keep small layers parallel; tiling never changes a row's sums.
  const int64_t min_tiles = 4 * std::max<int64_t>(1, threads);
  const int64_t by_threads = RoundUp((d.n_out + min_tiles - 1) / min_tiles, kGemmRows);
  const int64_t tile = std::max<int64_t>(kGemmRows, std::min(TileRowsBySize(d.groups * b_pad), by_threads));
  const int64_t num_tiles = (d.n_out + tile - 1) / tile;
  auto packed = std::make_shared<std::vector<float>>(PackKernel(kernel, d, b_pad));
  auto body = [=](int64_t task) {
    const int64_t first = task * tile;
    const int64_t rows = std::min(tile, d.n_out - first);
    const RowSums<T> sums(out, first, rows, d, b_pad);
    GatherGemmRows(features, packed->data(), nbr, tap_column, d, b_pad, first, rows, sums.data(),
                   [](int64_t, int64_t, const int32_t*, const int32_t*) {});
    sums.Store();
  };
  return Tasks{num_tiles, body, [] {}};
}

ffi::Future GatherGemmImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer kernel,
                           ffi::AnyBuffer nbr, int64_t groups, int64_t reverse_taps,
                           ffi::Result<ffi::AnyBuffer> out) {
  ConvDims d;
  const std::string message = ValidateGatherGemm(features, kernel, nbr, groups, *out, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return RunTasks(pool, GatherGemmTasks(pool.num_threads(), static_cast<const T*>(features.untyped_data()),
                                          static_cast<const T*>(kernel.untyped_data()), nbr.typed_data<int32_t>(),
                                          reverse_taps != 0, d, static_cast<T*>(out->untyped_data())));
  });
}

// ---- jsparse_conv_weight_grad ----

// The kernel gradient's row ranges: at most 16, at least 4096 rows each (a function of N only,
// never of the thread count, so that the sums' order is fixed).
int64_t KernelGradRange(int64_t n) { return std::max<int64_t>(4096, (n + 15) / 16); }

// Float32 kernel-gradient partials [a_pad][groups * b_pad], one per (row range, tap), and their
// sum. The partials are summed in a fixed binary tree over the ranges: node j of level L covers
// ranges [j << L, (j + 1) << L) and keeps its sum in the partials of range j << L, so the order of
// the additions never depends on scheduling. A node is summed by the task that completes the
// second of its two children: no task waits, and the sums of different nodes run in parallel.
// (Waiting for other tasks would hold a worker that XLA may need for a call it runs beside this
// one on the same pool, such as the input gradient's.)
class KernelGradPartials {
 public:
  KernelGradPartials(int64_t num_ranges, const ConvDims& d, int64_t b_pad)
      : num_ranges_(num_ranges), d_(d), b_pad_(b_pad), ldc_(d.groups * b_pad),
        size_(RoundUp(d.a, kGemmRows) * ldc_),
        // Left uninitialized: Use() clears a partial when a task first needs it (most (range,
        // tap) pairs of a large map are used, and clearing all up front would be a serial pass).
        partials_(new float[num_ranges * d.taps * size_]),
        used_(num_ranges * d.taps, 0) {
    while ((int64_t{1} << levels_) < num_ranges) ++levels_;
    arrivals_.reset(new std::atomic<int>[std::max<int64_t>(1, levels_ * num_ranges)]());
  }

  // The partial [a_pad][ldc] of (range, tap k), cleared on first use; only range's task may call.
  float* Use(int64_t range, int64_t k) {
    float* partial = At(range, k);
    if (!used_[range * d_.taps + k]) {
      used_[range * d_.taps + k] = 1;
      std::fill_n(partial, size_, 0.0f);
    }
    return partial;
  }
  int64_t ldc() const { return ldc_; }

  // Called by each range's task once its partials are complete: sums every node whose second
  // child this completes, from the leaf up.
  void Climb(int64_t leaf) {
    for (int64_t level = 0, node = leaf; level < levels_; ++level, node >>= 1) {
      const int64_t left = node & ~int64_t{1};
      if (((left + 1) << level) >= num_ranges_) continue;  // no right sibling: the sum is the left's
      // acq_rel: the second child's task sees every write of the first child's subtree.
      if (arrivals_[level * num_ranges_ + (node >> 1)].fetch_add(1, std::memory_order_acq_rel) == 0) return;
      Add(left << level, (left + 1) << level);
    }
  }

  // d_kernel [K, a, groups * b] from the root (range 0's partials); after every Climb.
  template <typename T>
  void Store(T* d_kernel) const {
    for (int64_t k = 0; k < d_.taps; ++k) {
      const bool any = num_ranges_ > 0 && used_[k];
      const float* sum = partials_.get() + k * size_;
      for (int64_t c = 0; c < d_.a; ++c) {
        T* dst = d_kernel + (k * d_.a + c) * d_.c_out();
        for (int64_t g = 0; g < d_.groups; ++g) {
          for (int64_t j = 0; j < d_.b; ++j) {
            dst[g * d_.b + j] = FromFloat<T>(any ? sum[c * ldc_ + g * b_pad_ + j] : 0.0f);
          }
        }
      }
    }
  }

 private:
  float* At(int64_t range, int64_t k) const { return partials_.get() + (range * d_.taps + k) * size_; }

  // Range `from`'s partials added into range `into`'s, tap by tap.
  void Add(int64_t into, int64_t from) {
    for (int64_t k = 0; k < d_.taps; ++k) {
      if (!used_[from * d_.taps + k]) continue;
      float* dst = At(into, k);
      const float* src = At(from, k);
      if (used_[into * d_.taps + k]) {
        for (int64_t e = 0; e < size_; ++e) dst[e] += src[e];
      } else {
        std::copy_n(src, size_, dst);
        used_[into * d_.taps + k] = 1;
      }
    }
  }

  int64_t num_ranges_;
  ConvDims d_;
  int64_t b_pad_, ldc_, size_;
  std::unique_ptr<float[]> partials_;
  std::vector<char> used_;  // per (range, tap); each entry written by one task at a time
  int64_t levels_ = 0;
  std::unique_ptr<std::atomic<int>[]> arrivals_;  // per tree node: children completed
};

// Adds the float32 pairs' products x[i]^T dy[o] of one tap to its partial, reading the rows in
// place: x_row(p) and y_row(p) point at pair p's features and d_out rows. Needs FillsGemmBlocks(d).
template <typename XRow, typename YRow>
void AddPairProducts(int64_t count, XRow x_row, YRow y_row, const ConvDims& d, int64_t b_pad, int64_t ldc,
                     float* partial) {
  constexpr int64_t kChunk = 256;  // pairs per micro-kernel call
  const float* x_rows[kChunk];
  const float* y_rows[kChunk];
  float* c_rows[kGemmRows];
  for (int64_t begin = 0; begin < count; begin += kChunk) {
    const int64_t len = std::min<int64_t>(kChunk, count - begin);
    for (int64_t g = 0; g < d.groups; ++g) {
      for (int64_t p = 0; p < len; ++p) {
        x_rows[p] = x_row(begin + p) + g * d.a;
        y_rows[p] = y_row(begin + p) + g * d.b;
      }
      for (int64_t r0 = 0; r0 < d.a; r0 += kGemmRows) {
        for (int r = 0; r < kGemmRows; ++r) c_rows[r] = partial + (r0 + r) * ldc;
        GemmRowsGathered(x_rows, r0, y_rows, len, b_pad, c_rows, g * b_pad);
      }
    }
  }
}

template <typename T>
Tasks WeightGradTasks(const T* features, const T* d_out, const int32_t* nbr, const ConvDims& d, T* d_kernel) {
  const int64_t b_pad = RoundUp(d.b, GemmLanes());
  const int64_t a_pad = RoundUp(d.a, kGemmRows);
  const int64_t ldc = d.groups * b_pad;
  // Each range's task sums its pairs per tap into its own partials.
  const int64_t range = KernelGradRange(d.n_out);
  const int64_t num_ranges = (d.n_out + range - 1) / range;
  // float32 rows whose channel blocks fill whole micro-kernel blocks are read in place.
  const bool in_place = std::is_same_v<T, float> && FillsGemmBlocks(d);
  auto partials = std::make_shared<KernelGradPartials>(num_ranges, d, b_pad);
  auto body = [=](int64_t task) {
    const int64_t first = task * range;
    const int64_t last = std::min(d.n_out, first + range);
    // (output row, input row) pairs of each tap within the range, in output-row order.
    const PairsByTap pairs = GroupPairsByTap(nbr + first * d.taps, last - first, d.taps, d.n_in,
                                             [](int64_t k) { return k; });
    // The copying path's float32 rows (empty when the rows are read in place).
    constexpr int64_t kChunk = 256;  // pairs gathered at a time
    std::vector<float> x(in_place ? 0 : kChunk * d.c_in());
    std::vector<float> dy(in_place ? 0 : kChunk * ldc, 0.0f);
    std::vector<float> tail(in_place ? 0 : kGemmRows * kChunk);  // the last channel block, zero-padded
    float* c_rows[kGemmRows];
    for (int64_t k = 0; k < d.taps; ++k) {
      const int64_t count = pairs.tap_start[k + 1] - pairs.tap_start[k];
      const int32_t* outputs = pairs.rows.get() + pairs.tap_start[k];  // relative to `first`
      const int32_t* inputs = pairs.inputs.get() + pairs.tap_start[k];
      if (count == 0) continue;
      float* partial = partials->Use(task, k);
      if (in_place) {  // float32 rows read where they are: no gathering copies
        const float* xs = reinterpret_cast<const float*>(features);
        const float* ys = reinterpret_cast<const float*>(d_out);
        AddPairProducts(
            count, [&](int64_t p) { return xs + int64_t{inputs[p]} * d.c_in(); },
            [&](int64_t p) { return ys + (first + outputs[p]) * d.c_out(); }, d, b_pad, ldc, partial);
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
    partials->Climb(task);
  };
  return Tasks{num_ranges, body, [=]() { partials->Store(d_kernel); }};
}

ffi::Future WeightGradImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer d_out,
                           ffi::AnyBuffer nbr, int64_t groups, ffi::Result<ffi::AnyBuffer> d_kernel) {
  ConvDims d;
  const std::string message = ValidateWeightGrad(features, d_out, nbr, groups, *d_kernel, &d);
  if (!message.empty()) return InvalidArgumentFuture(message);
  return DispatchFeatureType(features.element_type(), [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return RunTasks(pool, WeightGradTasks(static_cast<const T*>(features.untyped_data()),
                                          static_cast<const T*>(d_out.untyped_data()), nbr.typed_data<int32_t>(), d,
                                          static_cast<T*>(d_kernel->untyped_data())));
  });
}

// ---- jsparse_conv_backward_symmetric ----

// Both gradients of a convolution over an odd submanifold map, whose transpose is nbr with its
// taps reversed, in one pass over its pairs. For input row r and tap k with j = nbr[r, K - 1 - k]
// (by symmetry nbr[j, k] = r):
//   d_features[r] += d_out[j] @ kernel[k]^T   and   d_kernel[k] += features[r]^T d_out[j].
// The pairs are grouped once, the d_out rows gathered for the input gradient are still in cache
// when the kernel gradient reads them, and the features are read in row order. Each task owns a
// range of rows (KernelGradRange: its partials' order is fixed) and walks it in output tiles.
Tasks BackwardSymmetricTasks(const float* features, const float* d_out, const float* kernel_t, const int32_t* nbr,
                             const ConvDims& d, float* d_features, float* d_kernel) {
  // The input gradient gathers d_out rows through the reversed taps, with kernel_t [K, b, G * a].
  const ConvDims dx{d.n_out, d.n_in, d.taps, d.groups, d.b, d.a};
  const int64_t dx_b_pad = RoundUp(dx.b, GemmLanes());
  const int64_t b_pad = RoundUp(d.b, GemmLanes());
  auto packed = std::make_shared<std::vector<float>>(PackKernel(kernel_t, dx, dx_b_pad));
  const int64_t range = KernelGradRange(d.n_in);
  const int64_t num_ranges = (d.n_in + range - 1) / range;
  const int64_t tile = TileRowsBySize(dx.groups * dx_b_pad);
  auto partials = std::make_shared<KernelGradPartials>(num_ranges, d, b_pad);
  auto reversed = [=](int64_t k) { return d.taps - 1 - k; };
  auto body = [=](int64_t task) {
    const int64_t last = std::min(d.n_in, (task + 1) * range);
    for (int64_t first = task * range; first < last; first += tile) {
      const int64_t rows = std::min(tile, last - first);
      const RowSums<float> sums(d_features, first, rows, dx, dx_b_pad);
      GatherGemmRows(d_out, packed->data(), nbr, reversed, dx, dx_b_pad, first, rows, sums.data(),
                     [&](int64_t k, int64_t count, const int32_t* tile_rows, const int32_t* gathered) {
                       if (count == 0) return;
                       AddPairProducts(
                           count, [&](int64_t p) { return features + (first + tile_rows[p]) * d.c_in(); },
                           [&](int64_t p) { return d_out + int64_t{gathered[p]} * d.c_out(); }, d, b_pad,
                           partials->ldc(), partials->Use(task, k));
                     });
      sums.Store();
    }
    partials->Climb(task);
  };
  return Tasks{num_ranges, body, [=]() { partials->Store(d_kernel); }};
}

ffi::Future BackwardSymmetricImpl(ffi::ThreadPool pool, ffi::AnyBuffer features, ffi::AnyBuffer d_out,
                                  ffi::AnyBuffer kernel_t, ffi::AnyBuffer nbr, int64_t groups,
                                  ffi::Result<ffi::AnyBuffer> d_features, ffi::Result<ffi::AnyBuffer> d_kernel) {
  ConvDims d;
  const std::string message =
      ValidateBackwardSymmetric(features, d_out, kernel_t, nbr, groups, *d_features, *d_kernel, &d);
  const auto dtype = features.element_type();
  if (!message.empty()) return InvalidArgumentFuture(message);
  // float32 channel blocks that fill the micro-kernel's take one pass for both gradients; the
  // rest take the input gradient (d_out through the reversed taps) and the kernel gradient side
  // by side. Both give the sums of jsparse_conv_gather_gemm and jsparse_conv_weight_grad.
  if (dtype == ffi::F32 && FillsGemmBlocks(d)) {
    return RunTasks(pool, BackwardSymmetricTasks(features.typed_data<float>(), d_out.typed_data<float>(),
                                                 kernel_t.typed_data<float>(), nbr.typed_data<int32_t>(), d,
                                                 d_features->typed_data<float>(), d_kernel->typed_data<float>()));
  }
  const ConvDims transposed{d.n_out, d.n_in, d.taps, d.groups, d.b, d.a};
  return DispatchFeatureType(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    const auto* x = static_cast<const T*>(features.untyped_data());
    const auto* dy = static_cast<const T*>(d_out.untyped_data());
    const int32_t* rows = nbr.typed_data<int32_t>();
    return RunTasks(pool,
                    GatherGemmTasks(pool.num_threads(), dy, static_cast<const T*>(kernel_t.untyped_data()), rows,
                                    /*reverse_taps=*/true, transposed, static_cast<T*>(d_features->untyped_data())),
                    WeightGradTasks(x, dy, rows, d, static_cast<T*>(d_kernel->untyped_data())));
  });
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvGatherGemmCpu, jsparse::GatherGemmImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_CONV_GATHER_GEMM_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvWeightGradCpu, jsparse::WeightGradImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_CONV_WEIGHT_GRAD_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_gather_gemm", JsparseConvGatherGemmCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_weight_grad", JsparseConvWeightGradCpu);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseConvBackwardSymmetricCpu, jsparse::BackwardSymmetricImpl,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_CONV_BACKWARD_SYMMETRIC_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_conv_backward_symmetric", JsparseConvBackwardSymmetricCpu);
