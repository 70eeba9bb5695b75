// Self-registration of FFI handlers: each kernel file names its targets once, next to the handler,
// and the extension's registrations() lists them all. Adding a kernel never edits module.cc.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace jsparse {

// (FFI target name, handler symbol) for every handler linked into this extension.
inline std::vector<std::pair<std::string, void*>>& FfiTargets() {
  static std::vector<std::pair<std::string, void*>> targets;
  return targets;
}

struct FfiTargetRegistration {
  FfiTargetRegistration(const char* name, void* handler) {
    FfiTargets().emplace_back(name, handler);
  }
};

}  // namespace jsparse

#define JSPARSE_CONCAT_INNER(a, b) a##b
#define JSPARSE_CONCAT(a, b) JSPARSE_CONCAT_INNER(a, b)

// Registers `handler` (a symbol from XLA_FFI_DEFINE_HANDLER_SYMBOL) under the FFI target `name`.
#define JSPARSE_REGISTER_FFI_TARGET(name, handler)                                  \
  static ::jsparse::FfiTargetRegistration JSPARSE_CONCAT(jsparse_registration_, \
                                                         __LINE__)(              \
      name, reinterpret_cast<void*>(handler))
