// The exact fixed-point XᵀX sum of calibration (fixedpoint.cpp): reference.fixed_point_add. Its own header, not
// kernels.h: one implementation for every instruction path (it is bound by memory, not by arithmetic).
#pragma once

#include <cstdint>

namespace svdq::cpu {

// Rows per block of the packed upper triangle (reference.PACK_ROWS): block rows [r0, r1), columns [r0, K), row-major,
// one block after another.
constexpr int64_t kPackRows = 256;

#if defined(__CUDACC__)
#define SVDQ_HOST_DEVICE __host__ __device__
#else
#define SVDQ_HOST_DEVICE
#endif

// Entries of a packed K x K upper triangle.
int64_t packed_size(int64_t K);

// Where row j (0 <= j < K) of a packed K x K upper triangle starts: the full blocks above its own (kPackRows rows
// each, of widths K − kPackRows·b), then its block's rows above it (K − r0 wide). The row holds columns [r0, K),
// r0 = j rounded down to kPackRows. Shared by the CPU and CUDA kernels, so the CPU tests check the GPU's indexing.
SVDQ_HOST_DEVICE inline int64_t packed_row_start(int64_t j, int64_t K) {
  const int64_t b = j / kPackRows, r0 = b * kPackRows;
  return kPackRows * (b * K - kPackRows * (b * (b - 1) / 2)) + (j - r0) * (K - r0);
}

// ints[e] += round_half_even(item[e] · 2^−(s_j + s_l + offset)) for every packed entry e = (j, l), with
// exponents[j] = s_j and the product formed exactly in float64. Returns whether every |units| < 2^62 and every
// diagonal entry of the updated ints < 2^62; when it returns false the integers are unspecified. item must be
// finite (the caller checks). ints: int64 [packed_size(K)]; item: float32 [packed_size(K)]; exponents: int64 [K];
// |exponents|, |offset| <= 512.
bool fixed_point_add(int64_t* ints, const float* item, const int64_t* exponents, int64_t K, int64_t offset,
                     int num_threads);

}  // namespace svdq::cpu
