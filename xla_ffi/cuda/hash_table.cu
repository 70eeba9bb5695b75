// jsparse.ops.HashTable on CUDA: the same targets, operands and table bits as xla_ffi/cpu/hash_table.cc.
//
// Probing and inserting are common/hash_table.h, the code the CPU handlers run, so both devices
// build the same layout. With linear probing the layout depends on the order of the inserts:
// - insert runs one thread per table, inserting its keys one after the other in input order,
//   exactly the CPU loop. (A parallel insert would race for slots; this is spconv's compatibility
//   API, not a hot path.)
// - query only reads the table: one thread per (table, key).
// - insert_exist_keys never changes the table's keys, so every key's slot is known up front: one
//   thread per (table, key) finds its slot and records itself with atomicMax in a per-slot scratch
//   word, then one thread per slot writes the value of the last key that found it. That is the
//   value a sequential loop leaves behind, whatever order the threads run in.
// Every handler runs on XLA's stream and never waits for the device. Under vmap every operand
// gains the same leading dimensions; each index into them is an independent table.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "../common/hash_table.h"
#include "../common/hash_table_args.h"
#include "../common/registry.h"
#include "cuda_util.cuh"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace jsparse {
namespace {

using Operand = ffi::AnyBuffer;
using Output = ffi::Result<ffi::AnyBuffer>;

// Threads per block of the insert kernel (one thread per table: tables are few).
constexpr int kInsertThreads = 32;

// ---- kernels ----------------------------------------------------------------------------------

// Table b (of `batch`) inserts keys[b, :] -> values[b, :] in order (ComputeInsert).
template <typename K, typename V>
__global__ void InsertKernel(K* table_keys, V* table_values, int32_t* dropped, int64_t capacity,
                             const K* keys, const V* values, int64_t n, int64_t batch) {
  JSPARSE_GRID_LOOP(b, batch) {
    ComputeInsert(table_keys + b * capacity, table_values + b * capacity, dropped + b, capacity, keys + b * n,
                  values + b * n, n);
  }
}

// Flat key j = b * n + i of `total` looks up keys[j] in table b.
template <typename K, typename V>
__global__ void QueryKernel(const K* table_keys, const V* table_values, int64_t capacity, const K* keys,
                            int64_t n, int64_t total, V* values, bool* found) {
  JSPARSE_GRID_LOOP(j, total) {
    const int64_t b = j / n;
    QueryKey(table_keys + b * capacity, table_values + b * capacity, capacity, keys[j], values + j, found + j);
  }
}

// Flat key j = b * n + i of `total`: found[j] says whether table b stores keys[j]; if it does,
// last[b * capacity + slot] becomes at least j + 1 (0 means no key found that slot).
template <typename K>
__global__ void FindLastKernel(const K* table_keys, int64_t capacity, const K* keys, int64_t n, int64_t total,
                               bool* found, unsigned long long* last) {
  JSPARSE_GRID_LOOP(j, total) {
    const int64_t b = j / n;
    const int64_t slot = FindSlot(table_keys + b * capacity, capacity, keys[j]);
    found[j] = slot >= 0;
    if (slot >= 0) atomicMax(last + b * capacity + slot, static_cast<unsigned long long>(j + 1));
  }
}

// Slot s of `slots` (all tables) takes the value of the last key that found it, if any.
template <typename V>
__global__ void WriteLastKernel(const unsigned long long* last, int64_t slots, const V* values,
                                V* table_values) {
  JSPARSE_GRID_LOOP(s, slots) {
    const unsigned long long j = last[s];
    if (j != 0) table_values[s] = values[j - 1];
  }
}

// ---- typed implementations --------------------------------------------------------------------

// Makes `out` hold `in`'s bytes on `stream`: nothing to do when XLA honoured input_output_aliases.
cudaError_t CopyIfNotAliased(cudaStream_t stream, const Operand& in, ffi::AnyBuffer& out) {
  if (out.untyped_data() == in.untyped_data() || in.size_bytes() == 0) return cudaSuccess;
  return cudaMemcpyAsync(out.untyped_data(), in.untyped_data(), in.size_bytes(), cudaMemcpyDeviceToDevice,
                         stream);
}

template <typename K, typename V>
void InsertImpl(cudaStream_t stream, const Operand& table_keys, ffi::AnyBuffer& keys_out,
                ffi::AnyBuffer& values_out, ffi::AnyBuffer& dropped_out, const Operand& keys,
                const Operand& values) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  const int64_t batch = HashTableCount(table_keys.dimensions());
  if (batch == 0 || n == 0) return;
  InsertKernel<K, V><<<BlocksFor(batch, kInsertThreads), kInsertThreads, 0, stream>>>(
      keys_out.reinterpret_data<K>(), values_out.reinterpret_data<V>(), dropped_out.reinterpret_data<int32_t>(),
      capacity, keys.reinterpret_data<K>(), values.reinterpret_data<V>(), n, batch);
}

template <typename K, typename V>
void QueryImpl(cudaStream_t stream, const Operand& table_keys, const Operand& table_values, const Operand& keys,
               ffi::AnyBuffer& values_out, ffi::AnyBuffer& found_out) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  const int64_t total = HashTableCount(table_keys.dimensions()) * n;
  if (total == 0) return;
  QueryKernel<K, V><<<BlocksFor(total), kThreads, 0, stream>>>(
      table_keys.reinterpret_data<K>(), table_values.reinterpret_data<V>(), capacity, keys.reinterpret_data<K>(),
      n, total, values_out.reinterpret_data<V>(), found_out.reinterpret_data<bool>());
}

// `last` holds one zeroed word per slot of every table.
template <typename K, typename V>
void InsertExistKeysImpl(cudaStream_t stream, const Operand& table_keys, ffi::AnyBuffer& values_out,
                         const Operand& keys, const Operand& values, ffi::AnyBuffer& found_out,
                         unsigned long long* last) {
  const int64_t capacity = table_keys.dimensions().back();
  const int64_t n = keys.dimensions().back();
  const int64_t batch = HashTableCount(table_keys.dimensions());
  const int64_t total = batch * n;
  FindLastKernel<K><<<BlocksFor(total), kThreads, 0, stream>>>(
      table_keys.reinterpret_data<K>(), capacity, keys.reinterpret_data<K>(), n, total,
      found_out.reinterpret_data<bool>(), last);
  WriteLastKernel<V><<<BlocksFor(batch * capacity), kThreads, 0, stream>>>(
      last, batch * capacity, values.reinterpret_data<V>(), values_out.reinterpret_data<V>());
}

// ---- handlers ---------------------------------------------------------------------------------

ffi::Error HashTableInsert(cudaStream_t stream, Operand table_keys, Operand table_values, Operand dropped,
                           Operand keys, Operand values, Output keys_out, Output values_out,
                           Output dropped_out) {
  const std::string op = "jsparse_hash_table_insert: ";
  const std::string message = ValidateHashTableInsert(table_keys, table_values, dropped, keys, values, *keys_out,
                                                      *values_out, *dropped_out);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  cudaError_t err = CopyIfNotAliased(stream, table_keys, *keys_out);
  if (err == cudaSuccess) err = CopyIfNotAliased(stream, table_values, *values_out);
  if (err == cudaSuccess) err = CopyIfNotAliased(stream, dropped, *dropped_out);
  if (err != cudaSuccess) return LaunchError(op);  // reports the copy's error (and clears it)
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertImpl<decltype(k), decltype(v)>(stream, table_keys, *keys_out, *values_out, *dropped_out, keys, values);
  });
  return LaunchError(op);
}

ffi::Error HashTableQuery(cudaStream_t stream, Operand table_keys, Operand table_values, Operand keys,
                          Output values_out, Output found_out) {
  const std::string message = ValidateHashTableQuery(table_keys, table_values, keys, *values_out, *found_out);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    QueryImpl<decltype(k), decltype(v)>(stream, table_keys, table_values, keys, *values_out, *found_out);
  });
  return LaunchError("jsparse_hash_table_query: ");
}

ffi::Error HashTableInsertExistKeys(cudaStream_t stream, ffi::ScratchAllocator scratch, Operand table_keys,
                                    Operand table_values, Operand keys, Operand values, Output values_out,
                                    Output found_out) {
  const std::string op = "jsparse_hash_table_insert_exist_keys: ";
  const std::string message =
      ValidateHashTableInsertExistKeys(table_keys, table_values, keys, values, *values_out, *found_out);
  if (!message.empty()) return ffi::Error::InvalidArgument(message);
  if (CopyIfNotAliased(stream, table_values, *values_out) != cudaSuccess) return LaunchError(op);
  const int64_t slots = HashTableCount(table_keys.dimensions()) * table_keys.dimensions().back();
  if (slots == 0 || keys.dimensions().back() == 0) return ffi::Error::Success();
  unsigned long long* last = AllocateScratch<unsigned long long>(scratch, slots);
  if (last == nullptr) return ScratchError(op, slots * static_cast<int64_t>(sizeof(unsigned long long)));
  if (cudaMemsetAsync(last, 0, static_cast<size_t>(slots) * sizeof(unsigned long long), stream) != cudaSuccess) {
    return LaunchError(op);
  }
  DispatchHashKeyValue(table_keys.element_type(), table_values.element_type(), [&](auto k, auto v) {
    InsertExistKeysImpl<decltype(k), decltype(v)>(stream, table_keys, *values_out, keys, values, *found_out,
                                                  last);
  });
  return LaunchError(op);
}

}  // namespace
}  // namespace jsparse

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertCuda, jsparse::HashTableInsert,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_HASH_TABLE_INSERT_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableQueryCuda, jsparse::HashTableQuery,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        JSPARSE_HASH_TABLE_QUERY_SIGNATURE);

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JsparseHashTableInsertExistKeysCuda, jsparse::HashTableInsertExistKeys,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()  // stream
        .Ctx<ffi::ScratchAllocator>()              // one word per slot: the last key that found it
        JSPARSE_HASH_TABLE_INSERT_EXIST_KEYS_SIGNATURE);

JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert", JsparseHashTableInsertCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_query", JsparseHashTableQueryCuda);
JSPARSE_REGISTER_FFI_TARGET("jsparse_hash_table_insert_exist_keys", JsparseHashTableInsertExistKeysCuda);
