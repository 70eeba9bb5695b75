#include "cpu_isa.h"

#include <cstdlib>
#include <string>

namespace jsparse {
namespace {

CpuIsa DetectCpuIsa() {
  const char* requested = std::getenv("JSPARSE_CPU_ISA");
  const std::string limit = requested == nullptr ? "avx512" : requested;
  if (limit == "portable") return CpuIsa::kPortable;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  __builtin_cpu_init();
  if (limit == "avx512" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kPortable;
}

}  // namespace

CpuIsa SelectedCpuIsa() {
  static const CpuIsa isa = DetectCpuIsa();
  return isa;
}

const char* CpuIsaName(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace jsparse
