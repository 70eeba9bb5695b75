// Helpers shared by the CPU handlers that take feature buffers (conv, pool): dtype checks and
// dispatch.
#pragma once

#include "../common/args.h"
#include "float_convert.h"
#include "xla/ffi/api/ffi.h"

namespace jsparse {

namespace ffi = xla::ffi;

// fn(static_cast<T*>(nullptr)) with T the storage type of a (validated) feature dtype.
template <typename Fn>
auto DispatchFeatureType(ffi::DataType type, Fn&& fn) {
  switch (type) {
    case ffi::F32: return fn(static_cast<float*>(nullptr));
    case ffi::BF16: return fn(static_cast<BFloat16*>(nullptr));
    default: return fn(static_cast<Float16*>(nullptr));
  }
}

}  // namespace jsparse
