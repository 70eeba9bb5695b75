// Instantiates gemm_rows.inc for each instruction set and dispatches to the one cpu_isa.h selects.
#include "gemm.h"

#include "cpu_isa.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define JSPARSE_GEMM_X86 1
#endif

#ifdef JSPARSE_GEMM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,fma")
#define JSPARSE_GEMM_NAMESPACE avx512
#define JSPARSE_GEMM_LANES 16
#include "gemm_rows.inc"
#undef JSPARSE_GEMM_NAMESPACE
#undef JSPARSE_GEMM_LANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define JSPARSE_GEMM_NAMESPACE avx2
#define JSPARSE_GEMM_LANES 8
#include "gemm_rows.inc"
#undef JSPARSE_GEMM_NAMESPACE
#undef JSPARSE_GEMM_LANES
#pragma GCC pop_options
#endif

#define JSPARSE_GEMM_NAMESPACE portable
#define JSPARSE_GEMM_LANES 4
#include "gemm_rows.inc"
#undef JSPARSE_GEMM_NAMESPACE
#undef JSPARSE_GEMM_LANES

namespace jsparse {
namespace {

const CpuIsa kIsa = SelectedCpuIsa();

}  // namespace

int64_t GemmLanes() {
  switch (kIsa) {
    case CpuIsa::kAvx512: return 16;
    case CpuIsa::kAvx2: return 8;
    default: return 4;
  }
}

void GemmRows(const float* a, int64_t a_row, int64_t a_inner, int64_t inner, const float* b,
              int64_t ldb, int64_t cols, float* const* c_rows, int64_t c_offset) {
  switch (kIsa) {
#ifdef JSPARSE_GEMM_X86
    case CpuIsa::kAvx512: return avx512::GemmRows(a, a_row, a_inner, inner, b, ldb, cols, c_rows, c_offset);
    case CpuIsa::kAvx2: return avx2::GemmRows(a, a_row, a_inner, inner, b, ldb, cols, c_rows, c_offset);
#endif
    default: return portable::GemmRows(a, a_row, a_inner, inner, b, ldb, cols, c_rows, c_offset);
  }
}

void GemmRowPointers(const float* const* a_rows, int64_t a_offset, int64_t inner, const float* b, int64_t ldb,
                     int64_t cols, float* const* c_rows, int64_t c_offset) {
  switch (kIsa) {
#ifdef JSPARSE_GEMM_X86
    case CpuIsa::kAvx512: return avx512::GemmRowPointers(a_rows, a_offset, inner, b, ldb, cols, c_rows, c_offset);
    case CpuIsa::kAvx2: return avx2::GemmRowPointers(a_rows, a_offset, inner, b, ldb, cols, c_rows, c_offset);
#endif
    default: return portable::GemmRowPointers(a_rows, a_offset, inner, b, ldb, cols, c_rows, c_offset);
  }
}

void GemmRowsGathered(const float* const* a_rows, int64_t a_offset, const float* const* b_rows, int64_t inner,
                      int64_t cols, float* const* c_rows, int64_t c_offset) {
  switch (kIsa) {
#ifdef JSPARSE_GEMM_X86
    case CpuIsa::kAvx512: return avx512::GemmRowsGathered(a_rows, a_offset, b_rows, inner, cols, c_rows, c_offset);
    case CpuIsa::kAvx2: return avx2::GemmRowsGathered(a_rows, a_offset, b_rows, inner, cols, c_rows, c_offset);
#endif
    default: return portable::GemmRowsGathered(a_rows, a_offset, b_rows, inner, cols, c_rows, c_offset);
  }
}

}  // namespace jsparse
