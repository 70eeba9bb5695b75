// nanobind module jsparse._ffi_cpu: exposes the CPU FFI handlers as PyCapsules.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(JsparseCheckIndicesCpu);

namespace {

template <typename Fn>
nb::capsule EncapsulateHandler(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_ffi_cpu, m) {
  // FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform="cpu").
  m.def("registrations", []() {
    nb::dict d;
    d["jsparse_check_indices"] = EncapsulateHandler(JsparseCheckIndicesCpu);
    return d;
  });
}
