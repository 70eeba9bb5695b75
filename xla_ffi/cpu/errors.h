// Argument errors of the CPU handlers: shapes spelled out in messages, and a failed future for
// handlers that return ffi::Future.
#pragma once

#include <cstdint>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace jsparse {

namespace ffi = xla::ffi;

// "[d0, d1, ...]".
inline std::string Shape(ffi::Span<const int64_t> dims) {
  std::string s = "[";
  for (size_t d = 0; d < dims.size(); ++d) s += (d ? ", " : "") + std::to_string(dims[d]);
  return s + "]";
}

// A future that has already failed with InvalidArgument(message).
inline ffi::Future InvalidArgumentFuture(const std::string& message) {
  ffi::Promise promise;
  promise.SetError(ffi::Error::InvalidArgument(message));
  return ffi::Future(promise);
}

}  // namespace jsparse
