// AVX2 + FMA + F16C quantize_act: the driver in quantize_x86.inc on ymm vectors. This is the only
// file built with -mavx2 -mfma -mf16c besides gemm_avx2.cpp; the dispatcher calls into it only after
// cpuid and XCR0 say the CPU and OS support those.
//
// Nothing in here may instantiate a std:: template or any other inline function with external
// linkage: the linker could keep this AVX2-compiled copy for the generic path too. Helpers live
// in an anonymous namespace; scratch memory is scalar.h's Buffer (plain aligned_alloc).

#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx2 {
namespace {

typedef __m256 VecF;
constexpr int kLanes = 8;
constexpr int kMicroRows = 4;  // register tile: 4 rows x 2 vectors = 8 independent FMA chains
constexpr int kMicroVecs = 2;
// Rows sharing one pass over lora_down: 16 keeps the down projection near the 2-FMA/cycle peak.
constexpr int64_t kTileRows = 16;
// lora_down staged as float32 once per tile when it is 16-bit (its conversion, per register tile, costs more).
constexpr bool kLoraInPlace = false;

// 8 consecutive elements of a `D` array, starting at element i, as float32.
template <DType D>
inline __m256 load_lanes(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::kBFloat16) {
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
      return _mm256_cvtph_ps(h);
    }
  }
}
inline __m256 vzero() { return _mm256_setzero_ps(); }
inline __m256 vloadf(const float* p) { return _mm256_loadu_ps(p); }
inline void vstoref(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vfma_bcast(const float* s, __m256 w, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_broadcast_ss(s), w, acc);
}

// 64 int32 codes in [-8, 7] (c[j] holds elements 8j..8j+7) -> 32 packed bytes.
inline void pack_group(const __m256i c[8], uint8_t* q) {
  // packs_* work within 128-bit lanes; this permutation puts the 4-byte runs back in order.
  const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i b0 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), fix);
  const __m256i b1 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(c[4], c[5]), _mm256_packs_epi32(c[6], c[7])), fix);
  // Each 16-bit lane is (even code | odd code << 8); fold it into (even & 15) | (odd & 15) << 4.
  const __m256i lo = _mm256_set1_epi16(0x000f);
  const __m256i hi = _mm256_set1_epi16(0x00f0);
  const __m256i r0 =
      _mm256_or_si256(_mm256_and_si256(b0, lo), _mm256_and_si256(_mm256_srli_epi16(b0, 4), hi));
  const __m256i r1 =
      _mm256_or_si256(_mm256_and_si256(b1, lo), _mm256_and_si256(_mm256_srli_epi16(b1, 4), hi));
  // packus interleaves the 64-bit halves of r0 and r1 per lane; 0xD8 = quads (0, 2, 1, 3).
  const __m256i out = _mm256_permute4x64_epi64(_mm256_packus_epi16(r0, r1), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), out);
}

// One group. x: the group's first element (`D`); sm: float32 [64] smooth; xh: float32 [64] out
// (x̂); q: uint8 [32] out; returns the scale.
static_assert(kGroupSize == 8 * kLanes, "quantize_group takes a group as 8 vectors");
template <DType D>
inline float quantize_group(const void* x, const float* sm, float* xh, uint8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[8];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm256_div_ps(load_lanes<D>(x, 8 * j), _mm256_loadu_ps(sm + 8 * j));
    _mm256_storeu_ps(xh + 8 * j, v[j]);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  const float s = _mm_cvtss_f32(m) / 7.0f;
  if (s == 0.0f) {  // all-zero group (or absmax/7 underflowed): codes 0, scale 0, no NaN
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    return s;
  }
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 qmin = _mm256_set1_ps(-8.0f);
  const __m256 qmax = _mm256_set1_ps(7.0f);
  __m256i c[8];
  for (int j = 0; j < 8; ++j) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(qmax, _mm256_max_ps(qmin, r));
    c[j] = _mm256_cvtps_epi32(r);  // exact: r is an integer in [-8, 7]
  }
  pack_group(c, q);
  return s;
}

}  // namespace

#include "quantize_x86.inc"

}  // namespace svdq::cpu::avx2
