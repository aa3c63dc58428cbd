// AVX2 + FMA + F16C W4A16 kernels: the driver of w4a16_x86.inc on ymm vectors, for the avx2 and avxvnni
// paths. A group's 32 code bytes are four vpmovzxbd of 8 bytes; each dword's low nibble (masked) and high
// nibble (shifted) are converted to float and turned into weights by one FMA with the group's scale and
// minimum (ymm has no 16-entry permute to look them up). Register blocks of up to 8 rows share each
// decoded vector. Compiled with this path's flags only (CMakeLists.txt); nothing here instantiates a std::
// template.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx2 {
namespace {

typedef __m256 VecF;
constexpr int kLanes = 8;
constexpr int kMaxRows = 8;  // 8 accumulators + scale, minimum, mask and the vector in flight: of 16 ymm

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
inline __m256 vset1(float f) { return _mm256_set1_ps(f); }
inline __m256 vloadf(const float* p) { return _mm256_loadu_ps(p); }
inline void vstoref(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 vadd(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 vmul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 vdiv(__m256 a, __m256 b) { return _mm256_div_ps(a, b); }
inline __m256 vfma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <typename F>
inline void group_vectors(const uint8_t* q, float s, float m, F&& f) {
  const __m256 sv = _mm256_set1_ps(s), mv = _mm256_set1_ps(m);
  const __m256i low = _mm256_set1_epi32(0x0f);
  for (int c = 0; c < 4; ++c) {
    const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * c)));
    f(2 * c, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d, low)), sv, mv));
    f(2 * c + 1, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d, 4)), sv, mv));
  }
}

// 64-bit quads (0, 2, 1, 3) of v.
inline __m256 quads_0213(__m256 v) { return _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(v), 0xD8)); }

inline void to_decode_order(const __m256 v[8], float* out, int64_t ld) {
  for (int c = 0; c < 4; ++c) {
    // shuffle_ps works within 128-bit lanes: (a0 a2 b0 b2 | a4 a6 b4 b6); the quad permute restores order.
    _mm256_storeu_ps(out + 2 * c * ld, quads_0213(_mm256_shuffle_ps(v[2 * c], v[2 * c + 1], 0x88)));
    _mm256_storeu_ps(out + (2 * c + 1) * ld, quads_0213(_mm256_shuffle_ps(v[2 * c], v[2 * c + 1], 0xDD)));
  }
}

inline void to_k_order(__m256 lo, __m256 hi, float* out) {
  const __m256 a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);  // (l0 h0 l1 h1 | l4 h4 l5 h5)
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(a, b, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(a, b, 0x31));
}

#include "bf16_bits_x86.inc"

// bfloat16 by bf16_bits (nearest even, NaN -> 0x7FC0), float16 by vcvtps2ph.
inline void store_lanes(void* p, int64_t i, __m256 v, DType dt) {
  if (dt == DType::kFloat32) return _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  __m128i h;
  if (dt == DType::kBFloat16) {
    const __m256i bits = bf16_bits(v);
    // packus works within 128-bit lanes; quads (0, 2) put the 8 results in the low half.
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08));
  } else {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
}

// No 16-bit permute on ymm: dequantize converts through float32 (to_k_order, store_lanes).
constexpr bool kBf16Table = false;
inline void group_bf16(const uint8_t*, float, float, uint16_t*) {}

}  // namespace

#include "w4a16_x86.inc"

}  // namespace svdq::cpu::avx2
