// jsparse.ops.HashTable on CPU: open addressing with linear probing (common/hash.h).
//
// A table is two arrays of `capacity` slots, keys and values; a slot is empty iff its key is
// std::numeric_limits<K>::max(), and empty slots hold the value 0. Inserts run in input order,
// one key after the other, so the layout is a pure function of the inputs; the Python reference
// path (jsparse/ops/_hash_table.py) follows the same probe sequence and produces the same bits.
// Queries only read the table and run in parallel on the XLA intra-op pool.
//
// Under vmap (vmap_method="broadcast_all") every operand gains the same leading dimensions; each
// index into them is an independent table.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <utility>

#include "../common/hash.h"
#include "../common/registry.h"
#include "errors.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

// Every operand is decoded as AnyBuffer so that a wrong dtype or rank gets our message instead
// of the decoder's "failed to decode operands".
using Operand = ffi::AnyBuffer;
using Output = ffi::Result<ffi::AnyBuffer>;

template <typename K>
constexpr K EmptyKey() {
  return std::numeric_limits<K>::max();
}

// The slot where the probe for `key` starts.
inline int64_t FirstSlot(int32_t key, int64_t capacity) {
  return static_cast<int64_t>(MixKey32(static_cast<uint32_t>(key)) % static_cast<uint64_t>(capacity));
}
inline int64_t FirstSlot(int64_t key, int64_t capacity) {
  return static_cast<int64_t>(MixKey64(static_cast<uint64_t>(key)) % static_cast<uint64_t>(capacity));
}

// The slot that holds `key`, else the first empty slot on its probe path, else -1 (the table is
// full and does not hold `key`). Visits at most `capacity` slots.
template <typename K>
int64_t ProbeSlot(const K* table_keys, int64_t capacity, K key) {
  int64_t slot = FirstSlot(key, capacity);
  for (int64_t step = 0; step < capacity; ++step) {
    const K k = table_keys[slot];
    if (k == key || k == EmptyKey<K>()) return slot;
    slot = NextSlot(slot, capacity);
  }
  return -1;
}

// The slot that holds `key`, or -1. The empty-slot marker is never found.
template <typename K>
int64_t FindSlot(const K* table_keys, int64_t capacity, K key) {
  if (key == EmptyKey<K>()) return -1;
  const int64_t slot = ProbeSlot(table_keys, capacity, key);
  return slot >= 0 && table_keys[slot] == key ? slot : -1;
}

// Inserts keys[i] -> values[i] for i = 0, 1, ..., n - 1 in order: an existing key gets the new
// value, a new key takes the first empty slot on its probe path. Keys that cannot be stored
// (table full, or the empty-slot marker itself) are counted in *dropped. V is the value's bits.
template <typename K, typename V>
void ComputeInsert(K* table_keys, V* table_values, int32_t* dropped, int64_t capacity, const K* keys,
                   const V* values, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = keys[i] == EmptyKey<K>() ? -1 : ProbeSlot(table_keys, capacity, keys[i]);
    if (slot < 0) {
      ++*dropped;
      continue;
    }
    table_keys[slot] = keys[i];
    table_values[slot] = values[i];
  }
}

// values[i] = the value stored for keys[i] and found[i] = true, or 0 and false when it is absent.
template <typename K, typename V>
void ComputeQuery(const K* table_keys, const V* table_values, int64_t capacity, const K* keys,
                  int64_t n, V* values, bool* found) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = FindSlot(table_keys, capacity, keys[i]);
    found[i] = slot >= 0;
    values[i] = slot >= 0 ? table_values[slot] : V{0};
  }
}

// For i in order: when keys[i] is stored, its value becomes values[i] (so of repeated keys the
// last wins); found[i] says whether it was stored. Never adds a key.
template <typename K, typename V>
void ComputeInsertExistKeys(const K* table_keys, V* table_values, int64_t capacity, const K* keys,
                            const V* values, int64_t n, bool* found) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t slot = FindSlot(table_keys, capacity, keys[i]);
    found[i] = slot >= 0;
    if (slot >= 0) table_values[slot] = values[i];
  }
}

// ---- argument checks --------------------------------------------------------------------------

bool IsKeyType(ffi::DataType t) { return t == ffi::S32 || t == ffi::S64; }
bool IsValueType(ffi::DataType t) {
  return t == ffi::S32 || t == ffi::S64 || t == ffi::F32 || t == ffi::F64;
}

// Shapes shared by every handler: table_keys and table_values [..., capacity] with one dtype
// each, keys [..., N] with the table's key dtype, the same leading (vmap) dimensions everywhere.
// Returns an empty string when they are valid, else a message for InvalidArgument.
std::string ValidateTable(const std::string& op, const Operand& table_keys, const Operand& table_values,
                          const Operand& keys) {
  const auto tk = table_keys.dimensions();
  const auto tv = table_values.dimensions();
  const auto k = keys.dimensions();
  if (!IsKeyType(table_keys.element_type())) {
    return op + "the table's keys must be int32 or int64; build tables with HashTable.create";
  }
  if (!IsValueType(table_values.element_type())) {
    return op + "the table's values must be int32, int64, float32 or float64; build tables with " +
           "HashTable.create";
  }
  if (tk.size() < 1 || tk.back() < 1) {
    return op + "the table's keys must be [capacity] with capacity >= 1, got shape " + Shape(tk);
  }
  if (!(tv == tk)) {
    return op + "the table's keys " + Shape(tk) + " and values " + Shape(tv) +
           " must have the same shape [capacity]";
  }
  if (keys.element_type() != table_keys.element_type()) {
    return op + "keys must have the table's key dtype (" +
           (table_keys.element_type() == ffi::S32 ? "int32" : "int64") + "); cast them with .astype";
  }
  bool batch_ok = k.size() == tk.size();
  for (size_t d = 0; batch_ok && d + 1 < k.size(); ++d) batch_ok = k[d] == tk[d];
  if (!batch_ok) {
    return op + "keys must be [N] (with the table's leading vmap dimensions), got shape " +
           Shape(k) + " for a table of shape " + Shape(tk);
  }
  return {};
}

// `values` (an input [..., N] or an output) must match `keys` in shape and the table's values in dtype.
std::string ValidateValues(const std::string& op, const char* what, ffi::DataType dtype,
                           ffi::Span<const int64_t> dims, const Operand& keys, const Operand& table_values) {
  if (dtype != table_values.element_type()) {
    return op + what + " must have the table's value dtype; cast them with .astype";
  }
  if (!(dims == keys.dimensions())) {
    return op + what + " must have the shape of keys " + Shape(keys.dimensions()) + ", got " +
           Shape(dims);
  }
  return {};
}

// Number of independent tables (the product of the leading vmap dimensions).
int64_t BatchCount(ffi::Span<const int64_t> table_dims) {
  int64_t b = 1;
  for (size_t d = 0; d + 1 < table_dims.size(); ++d) b *= table_dims[d];
  return b;
}

// Makes `out` hold `in`'s bytes: a no-op when XLA honoured input_output_aliases.
void CopyIfNotAliased(const Operand& in, ffi::AnyBuffer& out) {
  if (out.untyped_data() != in.untyped_data()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

// ---- typed implementations --------------------------------------------------------------------

template <typename K, typename V>
void InsertImpl(const Operand& table_keys, ffi::AnyBuffer& keys_out, ffi::AnyBuffer& values_out,
                ffi::AnyBuffer& dropped_out, const Operand& keys, const Operand& values) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  K* tk = keys_out.reinterpret_data<K>();
  V* tv = values_out.reinterpret_data<V>();
  int32_t* dropped = dropped_out.reinterpret_data<int32_t>();
  const K* k = keys.reinterpret_data<K>();
  const V* v = values.reinterpret_data<V>();
  for (int64_t b = 0, batch = BatchCount(table_keys.dimensions()); b < batch; ++b) {
    ComputeInsert(tk + b * capacity, tv + b * capacity, dropped + b, capacity, k + b * n, v + b * n, n);
  }
}

// Keys per task of a parallel query.
constexpr int64_t kQueryKeysPerTask = 1 << 14;

// Queries are independent, so the flat range of (table, key) pairs is split into contiguous
// tiles, one per task on the XLA intra-op pool; each task writes only its own outputs, so the
// result does not depend on the number of threads.
template <typename K, typename V>
ffi::Future QueryImpl(ffi::ThreadPool& pool, const Operand& table_keys, const Operand& table_values,
                      const Operand& keys, ffi::AnyBuffer& values_out, ffi::AnyBuffer& found_out) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  const int64_t total = BatchCount(table_keys.dimensions()) * n;
  const K* tk = table_keys.reinterpret_data<K>();
  const V* tv = table_values.reinterpret_data<V>();
  const K* k = keys.reinterpret_data<K>();
  V* v = values_out.reinterpret_data<V>();
  bool* found = found_out.reinterpret_data<bool>();
  // Keys [begin, end) of the flat range; key j belongs to table j / n.
  auto run = [=](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end;) {
      const int64_t b = j / n;
      const int64_t stop = std::min(end, (b + 1) * n);
      ComputeQuery(tk + b * capacity, tv + b * capacity, capacity, k + j, stop - j, v + j, found + j);
      j = stop;
    }
  };
  return ParallelFor(pool, (total + kQueryKeysPerTask - 1) / kQueryKeysPerTask, [=](int64_t task) {
    run(task * kQueryKeysPerTask, std::min(total, (task + 1) * kQueryKeysPerTask));
  });
}

template <typename K, typename V>
void InsertExistKeysImpl(const Operand& table_keys, ffi::AnyBuffer& values_out, const Operand& keys,
                         const Operand& values, ffi::AnyBuffer& found_out) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  const K* tk = table_keys.reinterpret_data<K>();
  V* tv = values_out.reinterpret_data<V>();
  const K* k = keys.reinterpret_data<K>();
  const V* v = values.reinterpret_data<V>();
  bool* found = found_out.reinterpret_data<bool>();
  for (int64_t b = 0, batch = BatchCount(table_keys.dimensions()); b < batch; ++b) {
    ComputeInsertExistKeys(tk + b * capacity, tv + b * capacity, capacity, k + b * n, v + b * n, n,
                           found + b * n);
  }
}

// Calls f(K{}, V{}) with K the key type and V an unsigned integer as wide as the value type:
// values are only moved, never computed with, so their bits are all that matter.
template <typename F>
void DispatchKeyValue(ffi::DataType key_type, ffi::DataType value_type, F&& f) {
  const bool wide_value = value_type == ffi::S64 || value_type == ffi::F64;
  if (key_type == ffi::S32) {
    wide_value ? f(int32_t{}, uint64_t{}) : f(int32_t{}, uint32_t{});
  } else {
    wide_value ? f(int64_t{}, uint64_t{}) : f(int64_t{}, uint32_t{});
  }
}

// ---- handlers ---------------------------------------------------------------------------------

ffi::Error HashTableInsert(Operand table_keys, Operand table_values, Operand dropped, Operand keys,
                           Operand values, Output keys_out, Output values_out, Output dropped_out) {
  const std::string op = "jsparse_hash_table_insert: ";
  std::string message = ValidateTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateValues(op, "values", values.element_type(), values.dimensions(), keys, table_values);
  }
  const auto tk = table_keys.dimensions();
  if (message.empty() && (dropped.element_type() != ffi::S32 ||
                          !(dropped.dimensions() == tk.first(tk.size() - 1)))) {
    message = op + "dropped must be an int32 scalar (one per table under vmap)";
  }
  if (message.empty() &&
      (keys_out->element_type() != table_keys.element_type() ||
       values_out->element_type() != table_values.element_type() ||
       dropped_out->element_type() != ffi::S32 || keys_out->size_bytes() != table_keys.size_bytes() ||
       values_out->size_bytes() != table_values.size_bytes() ||
       dropped_out->size_bytes() != dropped.size_bytes())) {
    message = op + "the outputs must have the types of (table keys, table values, dropped)";
  }
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  CopyIfNotAliased(table_keys, *keys_out);
  CopyIfNotAliased(table_values, *values_out);
  CopyIfNotAliased(dropped, *dropped_out);
  DispatchKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertImpl<decltype(k), decltype(v)>(table_keys, *keys_out, *values_out, *dropped_out, keys, values);
  });
  return ffi::Error::Success();
}

ffi::Future HashTableQuery(ffi::ThreadPool pool, Operand table_keys, Operand table_values, Operand keys,
                           Output values_out, Output found_out) {
  const std::string op = "jsparse_hash_table_query: ";
  std::string message = ValidateTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateValues(op, "the values output", values_out->element_type(),
                             values_out->dimensions(), keys, table_values);
  }
  if (message.empty() && (found_out->element_type() != ffi::PRED ||
                          !(found_out->dimensions() == keys.dimensions()))) {
    message = op + "the found output must be bool with the shape of keys";
  }
  if (!message.empty()) return InvalidArgumentFuture(message);
  std::optional<ffi::Future> future;
  DispatchKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    future.emplace(
        QueryImpl<decltype(k), decltype(v)>(pool, table_keys, table_values, keys, *values_out, *found_out));
  });
  return std::move(*future);
}

ffi::Error HashTableInsertExistKeys(Operand table_keys, Operand table_values, Operand keys,
                                    Operand values, Output values_out, Output found_out) {
  const std::string op = "jsparse_hash_table_insert_exist_keys: ";
  std::string message = ValidateTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateValues(op, "values", values.element_type(), values.dimensions(), keys, table_values);
  }
  if (message.empty() && (values_out->element_type() != table_values.element_type() ||
                          values_out->size_bytes() != table_values.size_bytes())) {
    message = op + "the values output must have the type of the table's values";
  }
  if (message.empty() && (found_out->element_type() != ffi::PRED ||
                          !(found_out->dimensions() == keys.dimensions()))) {
    message = op + "the found output must be bool with the shape of keys";
  }
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  CopyIfNotAliased(table_values, *values_out);
  DispatchKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertExistKeysImpl<decltype(k), decltype(v)>(table_keys, *values_out, keys, values, *found_out);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertCpu, jsparse::HashTableInsert,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()      // table keys [capacity] int32 | int64
        .Arg<ffi::AnyBuffer>()      // table values [capacity] int32 | int64 | float32 | float64
        .Arg<ffi::AnyBuffer>()      // dropped [] int32
        .Arg<ffi::AnyBuffer>()      // keys [N], the table's key dtype
        .Arg<ffi::AnyBuffer>()      // values [N], the table's value dtype
        .Ret<ffi::AnyBuffer>()      // table keys [capacity], aliases argument 0
        .Ret<ffi::AnyBuffer>()      // table values [capacity], aliases argument 1
        .Ret<ffi::AnyBuffer>());    // dropped [] int32, aliases argument 2

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableQueryCpu, jsparse::HashTableQuery,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()     // the XLA intra-op pool (parallel over keys)
        .Arg<ffi::AnyBuffer>()      // table keys [capacity] int32 | int64
        .Arg<ffi::AnyBuffer>()      // table values [capacity] int32 | int64 | float32 | float64
        .Arg<ffi::AnyBuffer>()      // keys [N], the table's key dtype
        .Ret<ffi::AnyBuffer>()      // values [N], the table's value dtype (0 where not found)
        .Ret<ffi::AnyBuffer>());    // found [N] bool

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertExistKeysCpu, jsparse::HashTableInsertExistKeys,
    ffi::Ffi::Bind()
        .Arg<ffi::AnyBuffer>()      // table keys [capacity] int32 | int64
        .Arg<ffi::AnyBuffer>()      // table values [capacity] int32 | int64 | float32 | float64
        .Arg<ffi::AnyBuffer>()      // keys [N], the table's key dtype
        .Arg<ffi::AnyBuffer>()      // values [N], the table's value dtype
        .Ret<ffi::AnyBuffer>()      // table values [capacity], aliases argument 1
        .Ret<ffi::AnyBuffer>());    // found [N] bool

JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert", JsparseHashTableInsertCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_query", JsparseHashTableQueryCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert_exist_keys", JsparseHashTableInsertExistKeysCpu);
