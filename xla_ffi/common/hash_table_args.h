// Argument checks and the dtype dispatch of the hash-table handlers (jsparse_hash_table_*),
// shared by CPU and CUDA: the same message for the same mistake on every device. Host code only.
//
// Every operand is decoded as AnyBuffer so that a wrong dtype or rank gets these messages instead
// of the decoder's "failed to decode operands". Under vmap (vmap_method="broadcast_all") every
// operand gains the same leading dimensions; each index into them is an independent table.
#pragma once

#include <cstdint>
#include <string>

#include "args.h"
#include "xla/ffi/api/ffi.h"

// The operands and results of each handler, bound after the device's contexts, if any
// (`ffi::Ffi::Bind().Ctx<...>() JSPARSE_HASH_TABLE_..._SIGNATURE`): both devices bind the same ones
// in the same order, so a call built in Python fits either.
#define JSPARSE_HASH_TABLE_INSERT_SIGNATURE                                                  \
  .Arg<ffi::AnyBuffer>()     /* table keys [capacity] int32 | int64 */                       \
      .Arg<ffi::AnyBuffer>() /* table values [capacity] int32 | int64 | float32 | float64 */ \
      .Arg<ffi::AnyBuffer>() /* dropped [] int32 */                                          \
      .Arg<ffi::AnyBuffer>() /* keys [N], the table's key dtype */                           \
      .Arg<ffi::AnyBuffer>() /* values [N], the table's value dtype */                       \
      .Ret<ffi::AnyBuffer>() /* table keys [capacity], aliases argument 0 */                 \
      .Ret<ffi::AnyBuffer>() /* table values [capacity], aliases argument 1 */               \
      .Ret<ffi::AnyBuffer>() /* dropped [] int32, aliases argument 2 */

#define JSPARSE_HASH_TABLE_QUERY_SIGNATURE                                                   \
  .Arg<ffi::AnyBuffer>()     /* table keys [capacity] int32 | int64 */                       \
      .Arg<ffi::AnyBuffer>() /* table values [capacity] int32 | int64 | float32 | float64 */ \
      .Arg<ffi::AnyBuffer>() /* keys [N], the table's key dtype */                           \
      .Ret<ffi::AnyBuffer>() /* values [N], the table's value dtype (0 where not found) */   \
      .Ret<ffi::AnyBuffer>() /* found [N] bool */

#define JSPARSE_HASH_TABLE_INSERT_EXIST_KEYS_SIGNATURE                                       \
  .Arg<ffi::AnyBuffer>()     /* table keys [capacity] int32 | int64 */                       \
      .Arg<ffi::AnyBuffer>() /* table values [capacity] int32 | int64 | float32 | float64 */ \
      .Arg<ffi::AnyBuffer>() /* keys [N], the table's key dtype */                           \
      .Arg<ffi::AnyBuffer>() /* values [N], the table's value dtype */                       \
      .Ret<ffi::AnyBuffer>() /* table values [capacity], aliases argument 1 */               \
      .Ret<ffi::AnyBuffer>() /* found [N] bool */

namespace jsparse {

inline bool IsHashKeyType(ffi::DataType t) { return t == ffi::S32 || t == ffi::S64; }
inline bool IsHashValueType(ffi::DataType t) {
  return t == ffi::S32 || t == ffi::S64 || t == ffi::F32 || t == ffi::F64;
}

// Shapes shared by every handler: table_keys and table_values [..., capacity] with one dtype
// each, keys [..., N] with the table's key dtype, the same leading (vmap) dimensions everywhere.
// Returns an empty string when they are valid, else a message for InvalidArgument.
inline std::string ValidateHashTable(const std::string& op, const ffi::AnyBuffer& table_keys,
                                     const ffi::AnyBuffer& table_values, const ffi::AnyBuffer& keys) {
  const auto tk = table_keys.dimensions();
  const auto tv = table_values.dimensions();
  const auto k = keys.dimensions();
  if (!IsHashKeyType(table_keys.element_type())) {
    return op + "the table's keys must be int32 or int64; build tables with HashTable.create";
  }
  if (!IsHashValueType(table_values.element_type())) {
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
inline std::string ValidateHashValues(const std::string& op, const char* what, ffi::DataType dtype,
                                      ffi::Span<const int64_t> dims, const ffi::AnyBuffer& keys,
                                      const ffi::AnyBuffer& table_values) {
  if (dtype != table_values.element_type()) {
    return op + what + " must have the table's value dtype; cast them with .astype";
  }
  if (!(dims == keys.dimensions())) {
    return op + what + " must have the shape of keys " + Shape(keys.dimensions()) + ", got " +
           Shape(dims);
  }
  return {};
}

// The found output: bool with the shape of keys.
inline std::string ValidateHashFound(const std::string& op, const ffi::AnyBuffer& found,
                                     const ffi::AnyBuffer& keys) {
  if (found.element_type() != ffi::PRED || !(found.dimensions() == keys.dimensions())) {
    return op + "the found output must be bool with the shape of keys";
  }
  return {};
}

// jsparse_hash_table_insert: (table_keys, table_values, dropped, keys, values) ->
// (table_keys, table_values, dropped), dropped int32 [] (one per table under vmap).
inline std::string ValidateHashTableInsert(const ffi::AnyBuffer& table_keys, const ffi::AnyBuffer& table_values,
                                           const ffi::AnyBuffer& dropped, const ffi::AnyBuffer& keys,
                                           const ffi::AnyBuffer& values, const ffi::AnyBuffer& keys_out,
                                           const ffi::AnyBuffer& values_out, const ffi::AnyBuffer& dropped_out) {
  const std::string op = "jsparse_hash_table_insert: ";
  std::string message = ValidateHashTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateHashValues(op, "values", values.element_type(), values.dimensions(), keys, table_values);
  }
  const auto tk = table_keys.dimensions();
  if (message.empty() && (dropped.element_type() != ffi::S32 ||
                          !(dropped.dimensions() == tk.first(tk.size() - 1)))) {
    message = op + "dropped must be an int32 scalar (one per table under vmap)";
  }
  if (message.empty() &&
      (keys_out.element_type() != table_keys.element_type() ||
       values_out.element_type() != table_values.element_type() ||
       dropped_out.element_type() != ffi::S32 || keys_out.size_bytes() != table_keys.size_bytes() ||
       values_out.size_bytes() != table_values.size_bytes() ||
       dropped_out.size_bytes() != dropped.size_bytes())) {
    message = op + "the outputs must have the types of (table keys, table values, dropped)";
  }
  return message;
}

// jsparse_hash_table_query: (table_keys, table_values, keys) -> (values, found).
inline std::string ValidateHashTableQuery(const ffi::AnyBuffer& table_keys, const ffi::AnyBuffer& table_values,
                                          const ffi::AnyBuffer& keys, const ffi::AnyBuffer& values_out,
                                          const ffi::AnyBuffer& found_out) {
  const std::string op = "jsparse_hash_table_query: ";
  std::string message = ValidateHashTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateHashValues(op, "the values output", values_out.element_type(), values_out.dimensions(),
                                 keys, table_values);
  }
  if (message.empty()) message = ValidateHashFound(op, found_out, keys);
  return message;
}

// jsparse_hash_table_insert_exist_keys: (table_keys, table_values, keys, values) ->
// (table_values, found).
inline std::string ValidateHashTableInsertExistKeys(const ffi::AnyBuffer& table_keys,
                                                    const ffi::AnyBuffer& table_values,
                                                    const ffi::AnyBuffer& keys, const ffi::AnyBuffer& values,
                                                    const ffi::AnyBuffer& values_out,
                                                    const ffi::AnyBuffer& found_out) {
  const std::string op = "jsparse_hash_table_insert_exist_keys: ";
  std::string message = ValidateHashTable(op, table_keys, table_values, keys);
  if (message.empty()) {
    message = ValidateHashValues(op, "values", values.element_type(), values.dimensions(), keys, table_values);
  }
  if (message.empty() && (values_out.element_type() != table_values.element_type() ||
                          values_out.size_bytes() != table_values.size_bytes())) {
    message = op + "the values output must have the type of the table's values";
  }
  if (message.empty()) message = ValidateHashFound(op, found_out, keys);
  return message;
}

// Number of independent tables (the product of the leading vmap dimensions).
inline int64_t HashTableCount(ffi::Span<const int64_t> table_dims) {
  int64_t b = 1;
  for (size_t d = 0; d + 1 < table_dims.size(); ++d) b *= table_dims[d];
  return b;
}

// Calls f(K{}, V{}) with K the key type and V an unsigned integer as wide as the value type of
// validated tables: values are only moved, never computed with, so their bits are all that matter.
template <typename F>
void DispatchHashKeyValue(ffi::DataType key_type, ffi::DataType value_type, F&& f) {
  const bool wide_value = value_type == ffi::S64 || value_type == ffi::F64;
  if (key_type == ffi::S32) {
    wide_value ? f(int32_t{}, uint64_t{}) : f(int32_t{}, uint32_t{});
  } else {
    wide_value ? f(int64_t{}, uint64_t{}) : f(int64_t{}, uint32_t{});
  }
}

}  // namespace jsparse
