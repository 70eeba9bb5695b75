// A float32 micro-kernel for the gather-GEMM-scatter convolutions: kGemmRows rows of A times B,
// accumulated into rows of C reached through pointers (the rows of an output tile).
//
// Every output element is computed by the same instruction sequence whichever rows share its
// block, so results do not depend on how rows are tiled or which thread runs a tile. It runs on
// the instruction set of cpu_isa.h (AVX-512, AVX2 + FMA, or portable SSE2/generic).
#pragma once

#include <cstdint>

namespace jsparse {

// Rows per micro-kernel call; callers pad A with zero rows and point C's spare rows at scratch.
inline constexpr int kGemmRows = 8;

// Columns of B and C are processed in vectors of GemmLanes() floats; `cols` must be a multiple
// of it (callers zero-pad B).
int64_t GemmLanes();

// c_rows[r][c_offset + j] += sum_{i < inner} a[r * a_row + i * a_inner] * b[i * ldb + j]
// for r < kGemmRows and j < cols. A is read through two strides so that the weight gradient can
// use gathered rows as A's columns without transposing them.
void GemmRows(const float* a, int64_t a_row, int64_t a_inner, int64_t inner, const float* b,
              int64_t ldb, int64_t cols, float* const* c_rows, int64_t c_offset);

// GemmRows with A's rows read in place through pointers: c_rows[r][c_offset + j] +=
// sum_{i < inner} a_rows[r][a_offset + i] * b[i * ldb + j] (gathered float32 feature rows, without
// copies).
void GemmRowPointers(const float* const* a_rows, int64_t a_offset, int64_t inner, const float* b, int64_t ldb,
                     int64_t cols, float* const* c_rows, int64_t c_offset);

// c_rows[r][c_offset + j] += sum_{i < inner} a_rows[i][a_offset + r] * b_rows[i][j] for
// r < kGemmRows and j < cols (a multiple of GemmLanes()): GemmRows with A's columns and B's rows
// read in place, through a pointer per inner index (the weight gradient's pairs, without copies).
void GemmRowsGathered(const float* const* a_rows, int64_t a_offset, const float* const* b_rows, int64_t inner,
                      int64_t cols, float* const* c_rows, int64_t c_offset);

// Rounds n up to a multiple of m.
inline int64_t RoundUp(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

}  // namespace jsparse
