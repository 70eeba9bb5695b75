// The instruction set of the CPU kernels' vector code (the conv micro-kernel, the voxelizer's
// cell keys), picked once per process so that the extension loads on any x86-64 or other CPU.
#pragma once

namespace jsparse {

enum class CpuIsa { kAvx512, kAvx2, kPortable };

// The best instruction set the CPU has (AVX-512 F + VL + FMA, AVX2 + FMA, or portable SSE2 /
// generic code), or a lower one that $JSPARSE_CPU_ISA=avx512|avx2|portable asks for (to test
// the fallbacks), never one the CPU lacks.
CpuIsa SelectedCpuIsa();

// "avx512", "avx2" or "portable".
const char* CpuIsaName(CpuIsa isa);

}  // namespace jsparse
