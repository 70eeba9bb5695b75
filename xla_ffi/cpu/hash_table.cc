// jsparse.ops.HashTable on CPU: open addressing with linear probing (common/hash_table.h).
//
// A table is two arrays of `capacity` slots, keys and values; a slot is empty iff its key is
// iinfo(K).max, and empty slots hold the value 0. Inserts run in input order,
// one key after the other, so the layout is a pure function of the inputs; the Python reference
// path (jsparse/ops/_hash_table.py) follows the same probe sequence and produces the same bits.
// Queries only read the table and run in parallel on the XLA intra-op pool.
//
// Under vmap (vmap_method="broadcast_all") every operand gains the same leading dimensions; each
// index into them is an independent table. Argument checks: common/hash_table_args.h.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <utility>

#include "../common/hash_table.h"
#include "../common/hash_table_args.h"
#include "../common/registry.h"
#include "errors.h"
#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

using Operand = ffi::AnyBuffer;
using Output = ffi::Result<ffi::AnyBuffer>;

// values[i] = the value stored for keys[i] and found[i] = true, or 0 and false when it is absent.
template <typename K, typename V>
void ComputeQuery(const K* table_keys, const V* table_values, int64_t capacity, const K* keys,
                  int64_t n, V* values, bool* found) {
  for (int64_t i = 0; i < n; ++i) QueryKey(table_keys, table_values, capacity, keys[i], values + i, found + i);
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

// ---- typed implementations --------------------------------------------------------------------

// Makes `out` hold `in`'s bytes: a no-op when XLA honoured input_output_aliases.
void CopyIfNotAliased(const Operand& in, ffi::AnyBuffer& out) {
  if (out.untyped_data() != in.untyped_data()) {
    std::memcpy(out.untyped_data(), in.untyped_data(), in.size_bytes());
  }
}

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
  for (int64_t b = 0, batch = HashTableCount(table_keys.dimensions()); b < batch; ++b) {
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
  const int64_t total = HashTableCount(table_keys.dimensions()) * n;
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
  for (int64_t b = 0, batch = HashTableCount(table_keys.dimensions()); b < batch; ++b) {
    ComputeInsertExistKeys(tk + b * capacity, tv + b * capacity, capacity, k + b * n, v + b * n, n,
                           found + b * n);
  }
}

// ---- handlers ---------------------------------------------------------------------------------

ffi::Error HashTableInsert(Operand table_keys, Operand table_values, Operand dropped, Operand keys,
                           Operand values, Output keys_out, Output values_out, Output dropped_out) {
  const std::string message = ValidateHashTableInsert(table_keys, table_values, dropped, keys, values, *keys_out,
                                                      *values_out, *dropped_out);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  CopyIfNotAliased(table_keys, *keys_out);
  CopyIfNotAliased(table_values, *values_out);
  CopyIfNotAliased(dropped, *dropped_out);
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertImpl<decltype(k), decltype(v)>(table_keys, *keys_out, *values_out, *dropped_out, keys, values);
  });
  return ffi::Error::Success();
}

ffi::Future HashTableQuery(ffi::ThreadPool pool, Operand table_keys, Operand table_values, Operand keys,
                           Output values_out, Output found_out) {
  const std::string message = ValidateHashTableQuery(table_keys, table_values, keys, *values_out, *found_out);
  if (!message.empty()) return InvalidArgumentFuture(message);
  std::optional<ffi::Future> future;
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    future.emplace(
        QueryImpl<decltype(k), decltype(v)>(pool, table_keys, table_values, keys, *values_out, *found_out));
  });
  return std::move(*future);
}

ffi::Error HashTableInsertExistKeys(Operand table_keys, Operand table_values, Operand keys,
                                    Operand values, Output values_out, Output found_out) {
  const std::string message =
      ValidateHashTableInsertExistKeys(table_keys, table_values, keys, values, *values_out, *found_out);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  CopyIfNotAliased(table_values, *values_out);
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertExistKeysImpl<decltype(k), decltype(v)>(table_keys, *values_out, keys, values, *found_out);
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertCpu, jsparse::HashTableInsert,
    ffi::Ffi::Bind() JSPARSE_HASH_TABLE_INSERT_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableQueryCpu, jsparse::HashTableQuery,
    ffi::Ffi::Bind()
        .Ctx<ffi::ThreadPool>()     // the XLA intra-op pool (parallel over keys)
        JSPARSE_HASH_TABLE_QUERY_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertExistKeysCpu, jsparse::HashTableInsertExistKeys,
    ffi::Ffi::Bind() JSPARSE_HASH_TABLE_INSERT_EXIST_KEYS_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert", JsparseHashTableInsertCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_query", JsparseHashTableQueryCpu);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert_exist_keys", JsparseHashTableInsertExistKeysCpu);
