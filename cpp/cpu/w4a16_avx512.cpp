// AVX-512 (F/BW/VL/DQ) W4A16 kernels: the driver of w4a16_x86.inc on zmm vectors, for the avx512vnni path.
// A group's 32 code bytes are two vpmovzxbd of 16 bytes; each dword's low nibble and (after a shift) high
// nibble index a vpermps table of the group's 16 weight values q · s + m (one FMA per group builds it), so a
// zmm of weights costs one permute. Register blocks of up to 16 rows share each decoded vector.
// Compiled with the avx512vnni path's flags only (CMakeLists.txt); nothing here instantiates a std::
// template.
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx512 {
namespace {

typedef __m512 VecF;
constexpr int kLanes = 16;
constexpr int kMaxRows = 16;  // 16 accumulators + 4 weight vectors + the table: 21 of 32 zmm

template <DType D>
inline __m512 load_lanes(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}
inline __m512 vzero() { return _mm512_setzero_ps(); }
inline __m512 vset1(float f) { return _mm512_set1_ps(f); }
inline __m512 vloadf(const float* p) { return _mm512_loadu_ps(p); }
inline void vstoref(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vmul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 vdiv(__m512 a, __m512 b) { return _mm512_div_ps(a, b); }
inline __m512 vfma(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

template <typename F>
inline void group_vectors(const uint8_t* q, float s, float m, F&& f) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(m));
  const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
  const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
  // vpermps reads the low 4 bits of each index: the low nibble as it is, the high one shifted down.
  f(0, _mm512_permutexvar_ps(d0, table));
  f(1, _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), table));
  f(2, _mm512_permutexvar_ps(d1, table));
  f(3, _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), table));
}

inline void to_decode_order(const __m512 v[4], float* out, int64_t ld) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  for (int c = 0; c < 2; ++c) {
    _mm512_storeu_ps(out + 2 * c * ld, _mm512_permutex2var_ps(v[2 * c], even, v[2 * c + 1]));
    _mm512_storeu_ps(out + (2 * c + 1) * ld, _mm512_permutex2var_ps(v[2 * c], odd, v[2 * c + 1]));
  }
}

inline void to_k_order(__m512 lo, __m512 hi, float* out) {
  // Lane j of the first vector is lo[j/2] (j even) or hi[j/2] (index 16 + j/2); the second, 8 further.
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
  _mm512_storeu_ps(out, _mm512_permutex2var_ps(lo, first, hi));
  _mm512_storeu_ps(out + 16, _mm512_permutex2var_ps(lo, second, hi));
}

#include "bf16_bits_x86.inc"

// bfloat16 by bf16_bits (nearest even, NaN -> 0x7FC0), float16 by vcvtps2ph.
inline void store_lanes(void* p, int64_t i, __m512 v, DType dt) {
  if (dt == DType::kFloat32) return _mm512_storeu_ps(static_cast<float*>(p) + i, v);
  __m256i h;
  if (dt == DType::kBFloat16) {
    h = _mm512_cvtepi32_epi16(bf16_bits(v));
  } else {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
}

// The group's weights as bfloat16 by vpermw: its 16 values rounded once into a 32-entry word table (two
// copies), indexed per word: dword i = byte i | byte i << 12 holds, as words 2i and 2i + 1, an index whose
// low 5 bits are the low nibble (plus a bit the copy makes irrelevant) and the high nibble: k order.
constexpr bool kBf16Table = true;
inline void group_bf16(const uint8_t* q, float s, float m, uint16_t* out) {
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512 w = _mm512_fmadd_ps(iota, _mm512_set1_ps(s), _mm512_set1_ps(m));
  const __m512i table = _mm512_broadcast_i64x4(_mm512_cvtepi32_epi16(bf16_bits(w)));
  for (int c = 0; c < 2; ++c) {
    const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * c)));
    const __m512i idx = _mm512_or_si512(d, _mm512_slli_epi32(d, 12));
    _mm512_storeu_si512(out + 32 * c, _mm512_permutexvar_epi16(idx, table));
  }
}

}  // namespace

#include "w4a16_x86.inc"

}  // namespace svdq::cpu::avx512
