// A failed future for the CPU handlers that return ffi::Future (argument checks: common/args.h).
#pragma once

#include <cstdint>
#include <string>

#include "../common/args.h"
#include "xla/ffi/api/ffi.h"

namespace jsparse {

namespace ffi = xla::ffi;

// A future that has already failed with InvalidArgument(message).
inline ffi::Future InvalidArgumentFuture(const std::string& message) {
  ffi::Promise promise;
  promise.SetError(ffi::Error::InvalidArgument(message));
  return ffi::Future(promise);
}

}  // namespace jsparse
