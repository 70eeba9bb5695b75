// Kernel maps on CPU (jsparse.ops.output_sites and map_for_outputs), on open-addressing hash
// tables of packed 64-bit site keys (common/kmap.h, common/hash.h).
//
// jsparse_kmap_output_sites: the sites a conv / pool / transpose map creates. Tasks over input
//   rows insert every reachable output key into a shared insert-only table (compare-and-swap);
//   the set is independent of scheduling, and the last task sorts it, so outputs come sorted by
//   (batch, coords) and deduplicated. Sites past the capacity are counted in num_out, not written.
// jsparse_kmap_neighbors: nbr[o, k], the input row that output o reads through tap k (-1 if none),
//   and optionally its transpose nbr_t[i, k]. Odd submanifold maps over sites sorted by key (what
//   strided layers produce) walk the sorted keys with a cursor per tap; otherwise they are
//   symmetric (nbr[o, k] = i iff nbr[i, K-1-k] = o): a table of the sites, and each row looks up
//   half of its taps. Other
//   maps scatter: a table of the outputs, and each input looks up the outputs it reaches. Where
//   several rows could write one cell (only if sites repeat) the smallest row wins, so results
//   stay independent of scheduling.
// jsparse_kmap_build: both in one call for conv / pool / transpose maps, by sorting the candidate
//   (output key, input row, tap) triples; what build_map uses under jit.
// Rows with a batch index outside [0, batch_size) or coordinates outside the grid are inactive:
// they are never hashed, looked up or written through, so bad indices cannot cause an
// out-of-bounds access.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/hash.h"
#include "../common/kmap.h"
#include "../common/kmap_args.h"
#include "../common/registry.h"
#include "errors.h"
#include "parallel.h"
#include "scratch.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

constexpr uint64_t kEmptyKey = ~0ull;  // packed keys stay below 2**62
constexpr int64_t kRowsPerTask = 1024;

// *cell = min(*cell, value), where -1 means empty: deterministic when several tasks may write.
void StoreMinRow(int32_t* cell, int32_t value) {
  int32_t seen = __atomic_load_n(cell, __ATOMIC_RELAXED);
  while ((seen == -1 || value < seen) &&
         !__atomic_compare_exchange_n(cell, &seen, value, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
}

// Site key -> first (smallest) row holding it. Built by any number of tasks at once (Clear
// slices of slots, then Insert slices of rows: keys by compare-and-swap, rows by atomic minimum,
// so the result does not depend on scheduling), then read concurrently. Memory comes from the
// scratch cache.
class SiteTable {
 public:
  explicit SiteTable(int64_t rows)
      : mask_(TableSlots(rows) - 1),
        scratch_(AcquireScratch((mask_ + 1) * (sizeof(uint64_t) + sizeof(int32_t)))),
        keys_(reinterpret_cast<uint64_t*>(scratch_.get())),
        values_(reinterpret_cast<int32_t*>(keys_ + mask_ + 1)) {}

  int64_t slots() const { return mask_ + 1; }

  void Clear(int64_t begin, int64_t end) {
    std::fill(keys_ + begin, keys_ + end, kEmptyKey);
    std::fill(values_ + begin, values_ + end, -1);
  }

  // Inserts rows [begin, end) of indices [rows, 1 + ndim] that are active sites of the grid `shape`.
  void Insert(const int32_t* indices, int64_t begin, int64_t end, const MapGeometry& g, const int64_t* shape) {
    int64_t coords[kMaxMapNdim];
    for (int64_t r = begin; r < end; ++r) {
      const int32_t* row = indices + r * (1 + g.ndim);
      if (!SiteInRange(g, row, shape)) continue;
      for (int j = 0; j < g.ndim; ++j) coords[j] = row[1 + j];
      const uint64_t key = PackSite(row[0], coords, shape, g.ndim);
      uint64_t slot = SiteSlot(key, mask_);
      for (;; slot = (slot + 1) & mask_) {
        uint64_t seen = __atomic_load_n(&keys_[slot], __ATOMIC_RELAXED);
        if (seen == kEmptyKey &&
            __atomic_compare_exchange_n(&keys_[slot], &seen, key, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
          break;
        }
        if (seen == key) {  // a repeated site: the smallest row wins below
          repeated_.store(true, std::memory_order_relaxed);
          break;
        }
      }
      StoreMinRow(values_ + slot, static_cast<int32_t>(r));
    }
  }

  uint64_t Slot(uint64_t key) const { return SiteSlot(key, mask_); }

  // Whether some site was inserted twice (only possible under jit, where sites are unchecked).
  bool repeated() const { return repeated_.load(std::memory_order_relaxed); }

  void Prefetch(uint64_t slot) const {
    __builtin_prefetch(keys_ + slot);
    __builtin_prefetch(values_ + slot);
  }

  // The row holding `key` (-1 if none), probing from its Slot().
  int32_t Find(uint64_t key, uint64_t slot) const {
    for (;; slot = (slot + 1) & mask_) {
      if (keys_[slot] == key) return values_[slot];
      if (keys_[slot] == kEmptyKey) return -1;
    }
  }

 private:
  int64_t mask_;
  std::shared_ptr<std::byte> scratch_;
  uint64_t* keys_;
  int32_t* values_;
  std::atomic<bool> repeated_{false};
};

// A neighbours call in three stages of tasks: clear (the table's slots and nbr's rows), insert
// (the table's sites), then probe; each stage waits for the stages before it (parallel.h).
class StagedTable {
 public:
  StagedTable(int64_t table_rows, int64_t nbr_rows)
      : table(table_rows),
        slot_tasks_((table.slots() + kSlotsPerTask - 1) / kSlotsPerTask),
        nbr_tasks_((nbr_rows + kRowsPerTask - 1) / kRowsPerTask),
        insert_tasks_((table_rows + kRowsPerTask - 1) / kRowsPerTask) {}

  int64_t setup_tasks() const { return slot_tasks_ + nbr_tasks_ + insert_tasks_; }

  // Runs setup task `task` (< setup_tasks()); returns false for probe tasks, after waiting until
  // the table is complete. The rows to insert are rows of `sites`.
  bool Setup(int64_t task, const int32_t* sites, int64_t site_rows, const MapGeometry& g, const int64_t* shape,
             int32_t* nbr, int64_t nbr_rows) {
    if (task < slot_tasks_) {
      table.Clear(task * kSlotsPerTask, std::min(table.slots(), (task + 1) * kSlotsPerTask));
    } else if (task < slot_tasks_ + nbr_tasks_) {
      const int64_t first = (task - slot_tasks_) * kRowsPerTask;
      std::fill(nbr + first * g.taps, nbr + std::min(nbr_rows, first + kRowsPerTask) * g.taps, -1);
    } else if (task < setup_tasks()) {
      AwaitCount(done_, slot_tasks_ + nbr_tasks_);
      const int64_t first = (task - slot_tasks_ - nbr_tasks_) * kRowsPerTask;
      table.Insert(sites, first, std::min(site_rows, first + kRowsPerTask), g, shape);
    } else {
      AwaitCount(done_, setup_tasks());
      return false;
    }
    done_.fetch_add(1, std::memory_order_release);
    return true;
  }

  SiteTable table;

 private:
  static constexpr int64_t kSlotsPerTask = int64_t{1} << 16;
  const int64_t slot_tasks_, nbr_tasks_, insert_tasks_;
  std::atomic<int64_t> done_{0};
};

// ---- jsparse_kmap_output_sites ----

// n / d for n < 2**52: a float reciprocal gives the quotient to within one, then one correction;
// several times cheaper than 64-bit integer division, which dominated unpacking.
struct Divider {
  explicit Divider(int64_t divisor) : d(static_cast<uint64_t>(divisor)), inverse(1.0 / divisor) {}
  uint64_t Quotient(uint64_t n) const {
    uint64_t q = static_cast<uint64_t>(static_cast<double>(n) * inverse);
    if (q * d > n) --q;
    if ((q + 1) * d <= n) ++q;
    return q;
  }
  uint64_t d;
  double inverse;
};

// rows[r] = (batch, coords) of keys[r] over the output grid.
void UnpackSites(const uint64_t* keys, int64_t n, const MapGeometry& g, double key_range, int32_t* rows) {
  if (key_range >= 4.5e15) {  // beyond 2**52: exact integer division
    for (int64_t r = 0; r < n; ++r) UnpackSite(keys[r], g.out_shape, g.ndim, rows + r * (1 + g.ndim));
    return;
  }
  std::vector<Divider> dividers;
  for (int j = 0; j < g.ndim; ++j) dividers.emplace_back(g.out_shape[j]);
  for (int64_t r = 0; r < n; ++r) {
    uint64_t key = keys[r];
    int32_t* row = rows + r * (1 + g.ndim);
    for (int j = g.ndim - 1; j >= 0; --j) {
      const uint64_t q = dividers[j].Quotient(key);
      row[1 + j] = static_cast<int32_t>(key - q * dividers[j].d);
      key = q;
    }
    row[0] = static_cast<int32_t>(key);
  }
}

// The digits of a least-significant-digit radix sort of keys below `key_range`: as few passes
// as digits of at most 13 bits allow (8192 counters stay in L2), of equal width.
struct RadixDigits {
  explicit RadixDigits(double key_range) {
    const int bits = std::max(1, static_cast<int>(std::ceil(std::log2(std::max(key_range, 2.0)))));
    passes = (bits + 12) / 13;
    width = (bits + passes - 1) / passes;
  }
  uint64_t Digit(uint64_t key, int pass) const { return (key >> (pass * width)) & ((uint64_t{1} << width) - 1); }
  int passes, width;
};

// Sorts keys below `key_range` ascending (LSD radix sort).
void RadixSort(std::vector<uint64_t>& keys, double key_range) {
  const RadixDigits digits(key_range);
  std::vector<uint64_t> buffer(keys.size());
  std::vector<int64_t> offsets(int64_t{1} << digits.width);
  for (int pass = 0; pass < digits.passes; ++pass) {
    std::fill(offsets.begin(), offsets.end(), 0);
    for (uint64_t key : keys) ++offsets[digits.Digit(key, pass)];
    int64_t total = 0;
    for (int64_t& offset : offsets) total += std::exchange(offset, total);
    for (uint64_t key : keys) buffer[offsets[digits.Digit(key, pass)]++] = key;
    keys.swap(buffer);
  }
}

ffi::Future OutputSitesImpl(ffi::ThreadPool pool, ffi::AnyBuffer indices, GeometryAttrs attrs,
                            ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> num_out) {
  MapGeometry g;
  const std::string message = ValidateOutputSites(indices, attrs, *out_indices, *num_out, &g);
  if (!message.empty()) return InvalidArgumentFuture(message);
  const int64_t n = indices.dimensions()[0];
  const int64_t capacity = out_indices->dimensions()[0];
  const int32_t* in = indices.typed_data<int32_t>();
  int32_t* out = out_indices->typed_data<int32_t>();
  int32_t* count = num_out->typed_data<int32_t>();
  const int64_t bound =
      static_cast<int64_t>(std::min<double>(OutputKeyRange(g), static_cast<double>(n) * MaxTargetsPerInput(g)));
  auto table = std::make_shared<std::vector<uint64_t>>(TableSlots(bound), kEmptyKey);
  const uint64_t mask = table->size() - 1;
  auto insert_targets = [=](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    return [=](int64_t task) {
      std::vector<int64_t> axis_table(AxisTableSize(g));
      uint64_t* slots = table->data();
      for (int64_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
        const int32_t* row = in + r * (1 + g.ndim);
        if (!SiteInRange<kNdim>(g, row, g.in_shape)) continue;
        AxisTargets<kNdim>(g, row + 1, axis_table.data());
        ForEachTap<kNdim>(g, row[0], axis_table.data(), g.out_shape, [&](int64_t, uint64_t key) {
          for (uint64_t slot = SiteSlot(key, mask);; slot = (slot + 1) & mask) {
            uint64_t seen = __atomic_load_n(&slots[slot], __ATOMIC_RELAXED);
            if (seen == kEmptyKey && __atomic_compare_exchange_n(&slots[slot], &seen, key, false,
                                                                 __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
              break;
            }
            if (seen == key) break;  // present (possibly just inserted by another task)
          }
        });
      }
    };
  };
  const double key_range = OutputKeyRange(g);
  auto finish = [=]() {
    std::vector<uint64_t> keys;
    for (uint64_t key : *table) {
      if (key != kEmptyKey) keys.push_back(key);
    }
    RadixSort(keys, key_range);
    const int64_t written = std::min<int64_t>(capacity, keys.size());
    UnpackSites(keys.data(), written, g, key_range, out);
    std::fill(out + written * (1 + g.ndim), out + capacity * (1 + g.ndim), -1);
    *count = static_cast<int32_t>(std::min<uint64_t>(keys.size(), INT32_MAX));
  };
  return DispatchNdim(g.ndim, [&](auto ndim_constant) {
    return ParallelFor(pool, (n + kRowsPerTask - 1) / kRowsPerTask, insert_targets(ndim_constant), finish);
  });
}

// ---- jsparse_kmap_neighbors ----

// Probes are issued in groups: all slots of a group are prefetched first, so the cache misses of
// a group overlap instead of following one another.
struct Probe {
  int64_t row, tap;
  uint64_t key, slot;
};
constexpr int64_t kProbeGroup = 8;  // rows per group

// Submanifold map over sites whose active rows are sorted by key without repeats (what strided
// convolutions and build_map produce): each row finds its neighbours by walking the sorted keys
// with one monotone cursor per tap (a site's tap-t source key grows with the site's key), so no
// hash table is built or probed. Each task owns a range of rows and writes only those rows.
ffi::Future SortedNeighbors(ffi::ThreadPool& pool, const MapGeometry& g, const int32_t* sites, int64_t n,
                            std::shared_ptr<std::vector<uint64_t>> keys,
                            std::shared_ptr<std::vector<int32_t>> rows, int32_t* nbr) {
  auto walk = [=](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    return [=](int64_t task) {
      const uint64_t* key = keys->data();
      const int64_t m = static_cast<int64_t>(keys->size());
      std::vector<int64_t> axis_table(AxisTableSize(g));
      std::vector<int64_t> cursor(g.taps, -1);  // per tap: index into the sorted keys, -1 unset
      const int64_t last = std::min(n, (task + 1) * kRowsPerTask);
      for (int64_t o = task * kRowsPerTask; o < last; ++o) {
        const int32_t* row = sites + o * (1 + g.ndim);
        int32_t* out = nbr + o * g.taps;
        std::fill(out, out + g.taps, -1);
        if (!SiteInRange<kNdim>(g, row, g.in_shape)) continue;
        AxisSources<kNdim>(g, row + 1, axis_table.data());
        ForEachTap<kNdim>(g, row[0], axis_table.data(), g.in_shape, [&](int64_t t, uint64_t source) {
          int64_t& c = cursor[t];
          if (c < 0) c = std::lower_bound(key, key + m, source) - key;
          while (c < m && key[c] < source) ++c;
          if (c < m && key[c] == source) out[t] = (*rows)[c];
        });
      }
    };
  };
  return DispatchNdim(g.ndim, [&](auto ndim_constant) {
    return ParallelFor(pool, (n + kRowsPerTask - 1) / kRowsPerTask, walk(ndim_constant));
  });
}

// The keys and rows of the active sites if their keys strictly increase with the row (sorted,
// no repeats); false otherwise.
bool SortedSites(const MapGeometry& g, const int32_t* sites, int64_t n, std::vector<uint64_t>* keys,
                 std::vector<int32_t>* rows) {
  int64_t coords[kMaxMapNdim];
  keys->reserve(n);
  rows->reserve(n);
  for (int64_t r = 0; r < n; ++r) {
    const int32_t* row = sites + r * (1 + g.ndim);
    if (!SiteInRange(g, row, g.in_shape)) continue;
    for (int j = 0; j < g.ndim; ++j) coords[j] = row[1 + j];
    const uint64_t key = PackSite(row[0], coords, g.in_shape, g.ndim);
    if (!keys->empty() && key <= keys->back()) return false;
    keys->push_back(key);
    rows->push_back(static_cast<int32_t>(r));
  }
  return true;
}

// Odd submanifold map (outputs = inputs): tap t of row o is tap K - 1 - t of the row it finds,
// so each row looks up the taps up to the centre and writes both cells.
ffi::Future SymmetricNeighbors(ffi::ThreadPool& pool, const MapGeometry& g, const int32_t* sites, int64_t n,
                               int32_t* nbr) {
  auto staged = std::make_shared<StagedTable>(n, n);
  const SiteTable* table = &staged->table;
  const int64_t center = g.taps / 2;
  const int64_t setup = staged->setup_tasks();
  auto find = [=](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    return [=](int64_t job) {
      if (staged->Setup(job, sites, n, g, g.in_shape, nbr, n)) return;
      const int64_t task = job - setup;
      const bool repeated = table->repeated();
      std::vector<Probe> probes(kProbeGroup * g.taps);
      std::vector<int64_t> axis_table(AxisTableSize(g));
      const int64_t last = std::min(n, (task + 1) * kRowsPerTask);
      for (int64_t first = task * kRowsPerTask; first < last; first += kProbeGroup) {
        int64_t count = 0;
        for (int64_t o = first; o < std::min(last, first + kProbeGroup); ++o) {
          const int32_t* row = sites + o * (1 + g.ndim);
          if (!SiteInRange<kNdim>(g, row, g.in_shape)) continue;
          AxisSources<kNdim>(g, row + 1, axis_table.data());
          ForEachTap<kNdim>(g, row[0], axis_table.data(), g.in_shape, [&](int64_t t, uint64_t key) {
            if (t > center) return;
            const uint64_t slot = table->Slot(key);
            table->Prefetch(slot);
            probes[count++] = {o, t, key, slot};
          });
        }
        for (int64_t e = 0; e < count; ++e) {
          const Probe& q = probes[e];
          const int32_t i = table->Find(q.key, q.slot);
          if (i < 0) continue;
          nbr[q.row * g.taps + q.tap] = i;
          if (q.tap == center) continue;
          // Row i's cell has this one writer unless sites repeat; then the smallest row wins.
          int32_t* mirror = nbr + int64_t{i} * g.taps + (g.taps - 1 - q.tap);
          if (repeated) {
            StoreMinRow(mirror, int32_t(q.row));
          } else {
            *mirror = int32_t(q.row);
          }
        }
      }
    };
  };
  return DispatchNdim(g.ndim, [&](auto ndim_constant) {
    return ParallelFor(pool, setup + (n + kRowsPerTask - 1) / kRowsPerTask, find(ndim_constant));
  });
}

// Any map: each input row finds the output rows its taps reach in a table of the outputs and
// writes nbr[o, t] = i (and nbr_t[i, t] = o). An input reaches at most prod(ceil(k / s)) outputs
// of a strided map, far fewer than the K taps each output would look up. nbr_t (may be null) is
// cleared row by row by the task that owns the row.
ffi::Future ScatterNeighbors(ffi::ThreadPool& pool, const MapGeometry& g, const int32_t* in, int64_t n_in,
                             const int32_t* out, int64_t n_out, int32_t* nbr, int32_t* nbr_t) {
  auto staged = std::make_shared<StagedTable>(n_out, n_out);
  const SiteTable* table = &staged->table;
  const int64_t setup = staged->setup_tasks();
  auto scatter = [=](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    return [=](int64_t job) {
      if (staged->Setup(job, out, n_out, g, g.out_shape, nbr, n_out)) return;
      const int64_t task = job - setup;
      std::vector<Probe> probes(kProbeGroup * g.taps);
      std::vector<int64_t> axis_table(AxisTableSize(g));
      const int64_t last = std::min(n_in, (task + 1) * kRowsPerTask);
      for (int64_t first = task * kRowsPerTask; first < last; first += kProbeGroup) {
        int64_t count = 0;
        for (int64_t i = first; i < std::min(last, first + kProbeGroup); ++i) {
          const int32_t* row = in + i * (1 + g.ndim);
          if (nbr_t != nullptr) std::fill(nbr_t + i * g.taps, nbr_t + (i + 1) * g.taps, -1);  // row i is ours
          if (!SiteInRange<kNdim>(g, row, g.in_shape)) continue;
          AxisTargets<kNdim>(g, row + 1, axis_table.data());
          ForEachTap<kNdim>(g, row[0], axis_table.data(), g.out_shape, [&](int64_t t, uint64_t key) {
            const uint64_t slot = table->Slot(key);
            table->Prefetch(slot);
            probes[count++] = {i, t, key, slot};
          });
        }
        for (int64_t e = 0; e < count; ++e) {
          const Probe& q = probes[e];
          const int32_t o = table->Find(q.key, q.slot);
          if (o < 0) continue;  // not among the outputs (e.g. beyond the capacity)
          // Several inputs reach one (o, t) only if input sites repeat; then the smallest row wins.
          StoreMinRow(nbr + int64_t{o} * g.taps + q.tap, int32_t(q.row));
          if (nbr_t != nullptr) nbr_t[q.row * g.taps + q.tap] = o;
        }
      }
    };
  };
  return DispatchNdim(g.ndim, [&](auto ndim_constant) {
    return ParallelFor(pool, setup + (n_in + kRowsPerTask - 1) / kRowsPerTask, scatter(ndim_constant));
  });
}

ffi::Future NeighborsImpl(ffi::ThreadPool pool, ffi::AnyBuffer in_indices, ffi::AnyBuffer out_indices,
                          GeometryAttrs attrs, bool symmetric, ffi::Result<ffi::AnyBuffer> nbr,
                          ffi::Result<ffi::AnyBuffer> nbr_t) {
  MapGeometry g;
  const std::string message = ValidateNeighbors(in_indices, out_indices, attrs, symmetric, *nbr, *nbr_t, &g);
  if (!message.empty()) return InvalidArgumentFuture(message);
  const int64_t n_in = in_indices.dimensions()[0];
  const int64_t n_out = out_indices.dimensions()[0];
  const bool with_transpose = nbr_t->dimensions()[0] == n_in && n_in > 0;
  int32_t* forward = nbr->typed_data<int32_t>();
  int32_t* backward = nbr_t->typed_data<int32_t>();
  if (symmetric) {
    auto keys = std::make_shared<std::vector<uint64_t>>();
    auto rows = std::make_shared<std::vector<int32_t>>();
    const int32_t* sites = in_indices.typed_data<int32_t>();
    if (SortedSites(g, sites, n_in, keys.get(), rows.get())) {
      return SortedNeighbors(pool, g, sites, n_in, keys, rows, forward);
    }
    return SymmetricNeighbors(pool, g, sites, n_in, forward);
  }
  return ScatterNeighbors(pool, g, in_indices.typed_data<int32_t>(), n_in, out_indices.typed_data<int32_t>(),
                          n_out, forward, with_transpose ? backward : nullptr);
}

// ---- jsparse_kmap_build ----

// A conv / pool / transpose map in one call: output sites, nbr and nbr_t, by sorting candidate
// (output key, input row, tap) triples instead of hashing. Identical to output_sites followed by
// jsparse_kmap_neighbors, without the output hash table and the second pass. Three kinds of
// tasks, in this order (later tasks wait for earlier ones, see parallel.h):
// 1. Input tasks: the candidates of kRowsPerTask input rows, in row and tap order, stably
//    grouped into key buckets (the key's top bits) in the task's own region; they also clear
//    their nbr_t rows.
// 2. Clear tasks: nbr and out_indices rows to -1.
// 3. Bucket tasks, once all of the above are done: gather one bucket's candidates from every
//    region in task order, radix-sort them (stable, so equal keys stay in input-row order) and
//    publish the bucket's number of distinct keys; then, once every earlier bucket has published,
//    walk the sorted bucket: each distinct key is the next output row, and each candidate writes
//    nbr[o, t] (the first, i.e. smallest, input row wins if sites repeat) and nbr_t[i, t].
// Every row of every output has one writer, so results do not depend on scheduling.
struct Candidate {
  uint64_t key;
  uint32_t payload;  // input_row * K + tap
};

constexpr int kBucketBits = 6;  // up to 64 buckets of output keys

// Stable LSD radix sort of `n` candidates by key & (range - 1), range a power of two; `buffer`
// holds n more. The result ends in `data`.
void SortBucket(Candidate* data, Candidate* buffer, int64_t n, double range) {
  const RadixDigits digits(range);
  std::vector<int64_t> offsets(int64_t{1} << digits.width);
  for (int pass = 0; pass < digits.passes; ++pass) {
    std::fill(offsets.begin(), offsets.end(), 0);
    for (int64_t e = 0; e < n; ++e) ++offsets[digits.Digit(data[e].key, pass)];
    int64_t sum = 0;
    for (int64_t& offset : offsets) sum += std::exchange(offset, sum);
    for (int64_t e = 0; e < n; ++e) buffer[offsets[digits.Digit(data[e].key, pass)]++] = data[e];
    std::swap(data, buffer);
  }
  if (digits.passes % 2 == 1) std::copy_n(data, n, buffer);  // back into the caller's `data`
}

// State shared by the tasks of one jsparse_kmap_build call.
struct MapBuild {
  MapBuild(int64_t input_tasks, int64_t region, int64_t buckets)
      : region(region),
        buckets(buckets),
        scratch(AcquireScratch(2 * input_tasks * region * sizeof(Candidate))),
        regions(reinterpret_cast<Candidate*>(scratch.get())),
        sorted(regions + input_tasks * region),
        counts(input_tasks * buckets),
        distinct(new std::atomic<int64_t>[buckets]) {
    for (int64_t b = 0; b < buckets; ++b) distinct[b].store(-1, std::memory_order_relaxed);
  }
  const int64_t region, buckets;
  std::shared_ptr<std::byte> scratch;
  Candidate* regions;                    // [input_tasks, region]: each task's candidates by bucket
  Candidate* sorted;                     // every candidate, by bucket, each bucket sorted
  std::vector<int64_t> counts;           // [input_tasks, buckets]: candidates per task and bucket
  std::atomic<int64_t> prepared{0};      // input and clear tasks done
  std::unique_ptr<std::atomic<int64_t>[]> distinct;  // [buckets]: distinct keys, -1 until known
  std::atomic<int64_t> published{0};     // buckets whose distinct count is known, in order
};

ffi::Future BuildMapImpl(ffi::ThreadPool pool, ffi::AnyBuffer indices, GeometryAttrs attrs,
                         ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> num_out,
                         ffi::Result<ffi::AnyBuffer> nbr, ffi::Result<ffi::AnyBuffer> nbr_t) {
  MapGeometry g;
  const std::string message = ValidateBuildMap(indices, attrs, *out_indices, *num_out, *nbr, *nbr_t, &g);
  if (!message.empty()) return InvalidArgumentFuture(message);
  const int64_t n = indices.dimensions()[0];
  const int64_t capacity = out_indices->dimensions()[0];
  const int32_t* in = indices.typed_data<int32_t>();
  int32_t* out = out_indices->typed_data<int32_t>();
  int32_t* count = num_out->typed_data<int32_t>();
  int32_t* forward = nbr->typed_data<int32_t>();
  int32_t* backward = nbr_t->typed_data<int32_t>();
  const int64_t input_tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  const int64_t clear_tasks = (capacity + kRowsPerTask - 1) / kRowsPerTask;
  // Buckets: the keys' top bits, at most 2**kBucketBits of them; keys below 2**(shift) share one.
  const double key_range = OutputKeyRange(g);
  const int key_bits = std::max(1, static_cast<int>(std::ceil(std::log2(std::max(key_range, 2.0)))));
  const int shift = std::max(0, key_bits - kBucketBits);
  const int64_t buckets = ((int64_t{1} << key_bits) + (int64_t{1} << shift) - 1) >> shift;
  auto build = std::make_shared<MapBuild>(input_tasks, kRowsPerTask * MaxTargetsPerInput(g), buckets);
  const int taps = static_cast<int>(g.taps);
  const int64_t prepare_tasks = input_tasks + clear_tasks;

  auto body = [=](auto ndim_constant) {
    constexpr int kNdim = decltype(ndim_constant)::value;
    return [=](int64_t task) {
      MapBuild& m = *build;
      if (task < input_tasks) {
        std::vector<int64_t> axis_table(AxisTableSize(g));
        std::vector<Candidate> mine;
        mine.reserve(m.region);
        for (int64_t r = task * kRowsPerTask; r < std::min(n, (task + 1) * kRowsPerTask); ++r) {
          const int32_t* row = in + r * (1 + g.ndim);
          std::fill(backward + r * taps, backward + (r + 1) * taps, -1);  // row r is ours
          if (!SiteInRange<kNdim>(g, row, g.in_shape)) continue;
          AxisTargets<kNdim>(g, row + 1, axis_table.data());
          ForEachTap<kNdim>(g, row[0], axis_table.data(), g.out_shape, [&](int64_t t, uint64_t key) {
            mine.push_back({key, static_cast<uint32_t>(r * taps + t)});
          });
        }
        // Group by bucket, stably, into this task's region.
        int64_t* counts = m.counts.data() + task * buckets;
        for (const Candidate& c : mine) ++counts[c.key >> shift];
        std::vector<int64_t> cursor(buckets);
        for (int64_t b = 0, sum = 0; b < buckets; ++b) cursor[b] = std::exchange(sum, sum + counts[b]);
        Candidate* region = m.regions + task * m.region;
        for (const Candidate& c : mine) region[cursor[c.key >> shift]++] = c;
        m.prepared.fetch_add(1, std::memory_order_release);
        return;
      }
      if (task < prepare_tasks) {  // clear a block of output rows
        const int64_t first = (task - input_tasks) * kRowsPerTask;
        const int64_t last = std::min(capacity, first + kRowsPerTask);
        std::fill(forward + first * taps, forward + last * taps, -1);
        std::fill(out + first * (1 + g.ndim), out + last * (1 + g.ndim), -1);
        m.prepared.fetch_add(1, std::memory_order_release);
        return;
      }
      const int64_t bucket = task - prepare_tasks;
      AwaitCount(m.prepared, prepare_tasks);
      // Gather this bucket from every region, in task order, after the earlier buckets.
      // Where this bucket starts in each region (the task's earlier buckets) and in `sorted` (their sum).
      std::vector<int64_t> offset(input_tasks, 0);
      int64_t begin = 0, size = 0;
      for (int64_t t = 0; t < input_tasks; ++t) {
        const int64_t* counts = m.counts.data() + t * buckets;
        for (int64_t b = 0; b < bucket; ++b) offset[t] += counts[b];
        begin += offset[t];
      }
      Candidate* sorted = m.sorted + begin;
      for (int64_t t = 0; t < input_tasks; ++t) {
        const int64_t count = m.counts[t * buckets + bucket];
        std::copy_n(m.regions + t * m.region + offset[t], count, sorted + size);
        size += count;
      }
      std::vector<Candidate> buffer(size);
      SortBucket(sorted, buffer.data(), size, std::ldexp(1.0, shift));
      int64_t distinct = 0;
      for (int64_t e = 0; e < size; ++e) distinct += e == 0 || sorted[e].key != sorted[e - 1].key;
      m.distinct[bucket].store(distinct, std::memory_order_release);
      // This bucket's first output row: the distinct keys of the earlier buckets.
      int64_t row = 0;
      for (int64_t b = 0; b < bucket; ++b) {
        while (m.distinct[b].load(std::memory_order_acquire) < 0) std::this_thread::yield();
        row += m.distinct[b].load(std::memory_order_relaxed);
      }
      std::vector<uint64_t> sites;  // the distinct keys that fit, in order
      int64_t o = row - 1;
      for (int64_t e = 0; e < size; ++e) {
        if (e == 0 || sorted[e].key != sorted[e - 1].key) {
          if (++o < capacity) sites.push_back(sorted[e].key);
        }
        if (o >= capacity) break;  // beyond the capacity: counted, not written
        const int64_t i = sorted[e].payload / taps;
        const int64_t t = sorted[e].payload % taps;
        int32_t& cell = forward[o * taps + t];
        if (cell < 0) cell = static_cast<int32_t>(i);
        backward[i * taps + t] = static_cast<int32_t>(o);
      }
      if (!sites.empty()) {
        UnpackSites(sites.data(), static_cast<int64_t>(sites.size()), g, key_range, out + row * (1 + g.ndim));
      }
    };
  };
  auto finish = [=]() {
    int64_t total = 0;
    for (int64_t b = 0; b < buckets; ++b) total += build->distinct[b].load(std::memory_order_relaxed);
    *count = static_cast<int32_t>(std::min<int64_t>(total, INT32_MAX));
  };
  return DispatchNdim(g.ndim, [&](auto ndim_constant) {
    return ParallelFor(pool, prepare_tasks + buckets, body(ndim_constant), finish);
  });
}

}  // namespace
}  // namespace jsparse

namespace jsparse {
namespace {

ffi::Future OutputSitesEntry(ffi::ThreadPool pool, ffi::AnyBuffer indices, ffi::Span<const int64_t> k,
                             ffi::Span<const int64_t> s, ffi::Span<const int64_t> p,
                             ffi::Span<const int64_t> d, ffi::Span<const int64_t> in_shape,
                             ffi::Span<const int64_t> out_shape, int64_t transpose, int64_t batch_size,
                             ffi::Result<ffi::AnyBuffer> out_indices, ffi::Result<ffi::AnyBuffer> num_out) {
  return OutputSitesImpl(pool, indices, {k, s, p, d, in_shape, out_shape, transpose, batch_size},
                         out_indices, num_out);
}

ffi::Future BuildMapEntry(ffi::ThreadPool pool, ffi::AnyBuffer indices, ffi::Span<const int64_t> k,
                          ffi::Span<const int64_t> s, ffi::Span<const int64_t> p, ffi::Span<const int64_t> d,
                          ffi::Span<const int64_t> in_shape, ffi::Span<const int64_t> out_shape,
                          int64_t transpose, int64_t batch_size, ffi::Result<ffi::AnyBuffer> out_indices,
                          ffi::Result<ffi::AnyBuffer> num_out, ffi::Result<ffi::AnyBuffer> nbr,
                          ffi::Result<ffi::AnyBuffer> nbr_t) {
  return BuildMapImpl(pool, indices, {k, s, p, d, in_shape, out_shape, transpose, batch_size}, out_indices,
                      num_out, nbr, nbr_t);
}

ffi::Future NeighborsEntry(ffi::ThreadPool pool, ffi::AnyBuffer in_indices, ffi::AnyBuffer out_indices,
                           ffi::Span<const int64_t> k, ffi::Span<const int64_t> s,
                           ffi::Span<const int64_t> p, ffi::Span<const int64_t> d,
                           ffi::Span<const int64_t> in_shape, ffi::Span<const int64_t> out_shape,
                           int64_t transpose, int64_t batch_size, int64_t symmetric,
                           ffi::Result<ffi::AnyBuffer> nbr, ffi::Result<ffi::AnyBuffer> nbr_t) {
  return NeighborsImpl(pool, in_indices, out_indices, {k, s, p, d, in_shape, out_shape, transpose, batch_size},
                       symmetric != 0, nbr, nbr_t);
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapOutputSitesCpu, jsparse::OutputSitesEntry,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_KMAP_OUTPUT_SITES_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapNeighborsCpu, jsparse::NeighborsEntry,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_KMAP_NEIGHBORS_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseKmapBuildCpu, jsparse::BuildMapEntry,
    ffi::Ffi::Bind().Ctx<ffi::ThreadPool>() JSPARSE_KMAP_BUILD_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_output_sites", JsparseKmapOutputSitesCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_build", JsparseKmapBuildCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_kmap_neighbors", JsparseKmapNeighborsCpu);
