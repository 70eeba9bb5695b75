// nanobind module jsparse._ffi_cuda: exposes the CUDA FFI handlers as PyCapsules.
#include <nanobind/nanobind.h>

#include "xla/ffi/api/api.h"

namespace nb = nanobind;

XLA_FFI_DECLARE_HANDLER_SYMBOL(JsparseCheckIndicesCuda);

namespace {

template <typename Fn>
nb::capsule EncapsulateHandler(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_ffi_cuda, m) {
  // FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform="CUDA").
  m.def("registrations", []() {
    nb::dict d;
    d["jsparse_check_indices"] = EncapsulateHandler(JsparseCheckIndicesCuda);
    return d;
  });
}
