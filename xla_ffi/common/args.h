// Argument checks shared by the CPU and CUDA handlers: the same message for the same mistake on
// every device. Host code only.
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

// Feature dtypes the kernels read and write; they accumulate in float32.
inline bool IsFeatureType(ffi::DataType t) { return t == ffi::F32 || t == ffi::BF16 || t == ffi::F16; }

}  // namespace jsparse
