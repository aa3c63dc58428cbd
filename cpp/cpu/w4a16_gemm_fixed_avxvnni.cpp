// The many-rows fixed-point bfloat16 W4A16 linear (w4a16_gemm_fixed.inc) for the avxvnni path: ymm, VEX vpdpbusd.
// Compiled with this path's flags only (CMakeLists.txt).
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avxvnni {
namespace {

#include "bf16_bits_x86.inc"

// The inc's vector operations on ymm: 8 int32 / float32 lanes.
struct Vec {
  using I = __m256i;
  using F = __m256;
  static constexpr int L = 8;
  static I zero() { return _mm256_setzero_si256(); }
  // Loads, broadcasts and products in asm: with intrinsics GCC copies and spills the register block's sums.
  static I load(const void* p) {
    I w;
    asm("vmovdqu %[p], %[w]" : [w] "=x"(w) : [p] "m"(*static_cast<const I*>(p)));
    return w;
  }
  static I bcast(const void* p) {
    I x;
    asm("vpbroadcastd %[p], %[x]" : [x] "=x"(x) : [p] "m"(*static_cast<const int32_t*>(p)));
    return x;
  }
  // acc += Σ of 4 products u · s (unsigned · signed bytes) per lane. AT&T: vpdpbusd src2, src1, dst.
  static void dot(I& acc, I u, I s) {
    asm("%{vex%} vpdpbusd %[s], %[u], %[d]" : [d] "+x"(acc) : [u] "x"(u), [s] "x"(s));
  }
  static I shift8(I t) { return _mm256_slli_epi32(t, 8); }
  static F cvt(I t) { return _mm256_cvtepi32_ps(t); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static F add(F a, F b) { return _mm256_add_ps(a, b); }
  static F set1(float v) { return _mm256_set1_ps(v); }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
  // The first n (1..8) lanes rounded to bfloat16 (nearest even; NaN to 0x7FC0, as scalar.h f32_to_bf16).
  static void store_bf16(uint16_t* p, F v, int64_t n) {
    const __m256i r = bf16_bits(v);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (n == 8) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), h);
    } else {
      alignas(16) uint16_t t[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
      std::memcpy(p, t, n * sizeof(uint16_t));
    }
  }
};
// 6 rows x 2 vectors: 12 accumulators, 2 code vectors and a broadcast x̂ dword in ymm's 16 registers.
constexpr int kRows = 6;
constexpr int kCols = 2;

#include "w4a16_gemm_fixed.inc"

}  // namespace svdq::cpu::avxvnni
