// nanobind module jsparse._ffi_cuda: exposes the CUDA FFI handlers as PyCapsules.
#include <nanobind/nanobind.h>

#include "../common/registry.h"

namespace nb = nanobind;

NB_MODULE(_ffi_cuda, m) {
  // FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform="CUDA").
  // Each kernel file adds its targets with JSPARSE_REGISTER_FFI_TARGET.
  m.def("registrations", []() {
    nb::dict d;
    for (const auto& [name, handler] : jsparse::FfiTargets()) d[name.c_str()] = nb::capsule(handler);
    return d;
  });
}
