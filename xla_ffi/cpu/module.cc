// nanobind module jsparse._ffi_cpu: exposes the CPU FFI handlers as PyCapsules.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "../common/registry.h"
#include "cpu_isa.h"

namespace nb = nanobind;

NB_MODULE(_ffi_cpu, m) {
  // FFI target name -> handler capsule, for jax.ffi.register_ffi_target(..., platform="cpu").
  // Each kernel file adds its targets with JSPARSE_REGISTER_FFI_TARGET.
  m.def("registrations", []() {
    nb::dict d;
    for (const auto& [name, handler] : jsparse::FfiTargets()) d[name.c_str()] = nb::capsule(handler);
    return d;
  });
  // The instruction set of the CPU kernels' vector code ("avx512", "avx2" or "portable").
  m.def("cpu_isa", []() { return std::string(jsparse::CpuIsaName(jsparse::SelectedCpuIsa())); });
}
