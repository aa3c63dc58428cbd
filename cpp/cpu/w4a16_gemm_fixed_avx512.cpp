// The many-rows fixed-point bfloat16 W4A16 linear (w4a16_gemm_fixed.inc) for the AVX-512 paths (avx512vnni,
// avx512bf16, amx): zmm, EVEX vpdpbusd. Compiled with the avx512vnni path's flags (CMakeLists.txt).
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx512 {
namespace {

#include "bf16_bits_x86.inc"

// The inc's vector operations on zmm: 16 int32 / float32 lanes.
struct Vec {
  using I = __m512i;
  using F = __m512;
  static constexpr int L = 16;
  static I zero() { return _mm512_setzero_si512(); }
  // Loads, broadcasts and products in asm: with intrinsics GCC copies and spills the register block's sums.
  static I load(const void* p) {
    I w;
    asm("vmovdqu64 %[p], %[w]" : [w] "=v"(w) : [p] "m"(*static_cast<const I*>(p)));
    return w;
  }
  static I bcast(const void* p) {
    I x;
    asm("vpbroadcastd %[p], %[x]" : [x] "=v"(x) : [p] "m"(*static_cast<const int32_t*>(p)));
    return x;
  }
  // acc += Σ of 4 products u · s (unsigned · signed bytes) per lane. AT&T: vpdpbusd src2, src1, dst.
  static void dot(I& acc, I u, I s) { asm("vpdpbusd %[s], %[u], %[d]" : [d] "+v"(acc) : [u] "v"(u), [s] "v"(s)); }
  static I shift8(I t) { return _mm512_slli_epi32(t, 8); }
  static F cvt(I t) { return _mm512_cvtepi32_ps(t); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static F add(F a, F b) { return _mm512_add_ps(a, b); }
  static F set1(float v) { return _mm512_set1_ps(v); }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
  // The first n (1..16) lanes rounded to bfloat16 (nearest even; NaN to 0x7FC0, as scalar.h f32_to_bf16).
  static void store_bf16(uint16_t* p, F v, int64_t n) {
    _mm256_mask_storeu_epi16(p, static_cast<__mmask16>((1u << n) - 1), _mm512_cvtepi32_epi16(bf16_bits(v)));
  }
};
// 12 rows x 2 vectors: 24 accumulators, 2 code vectors and a broadcast x̂ dword of zmm's 32 registers.
constexpr int kRows = 12;
constexpr int kCols = 2;

#include "w4a16_gemm_fixed.inc"

}  // namespace svdq::cpu::avx512
