// The exact fixed-point XᵀX sum of calibration (fixedpoint.cpp): reference.fixed_point_add. Its own header, not
// kernels.h: one implementation for every instruction path (it is bound by memory, not by arithmetic).
#pragma once

#include <cstdint>

namespace svdq::cpu {

// Rows per block of the packed upper triangle (reference.PACK_ROWS): block rows [r0, r1), columns [r0, K), row-major,
// one block after another.
constexpr int64_t kPackRows = 256;

// Entries of a packed K x K upper triangle.
int64_t packed_size(int64_t K);

// ints[e] += round_half_even(item[e] · 2^−(s_j + s_l + offset)) for every packed entry e = (j, l), exponents[j] = s_j,
// the product formed exactly in float64. Returns whether every |units| < 2^62 and every diagonal entry of the
// updated ints < 2^62; when it returns false the integers are unspecified. item must be finite (the caller checks).
// ints: int64 [packed_size(K)]; item: float32 [packed_size(K)]; exponents: int64 [K]; |exponents|, |offset| < 512.
bool fixed_point_add(int64_t* ints, const float* item, const int64_t* exponents, int64_t K, int64_t offset,
                     int num_threads);

}  // namespace svdq::cpu
