// AVX-512 (F/BW/VL/DQ) quantize_act: the driver of quantize_x86.inc on zmm vectors, for the
// avx512vnni path, because the fused down projection (x̂ @ lora_down, 2·M·K·R flops) dominates
// quantize_act at large K and is FMA-bound. Register tiles of 8 rows x 2 zmm (16 FMA chains, one
// embedded broadcast each) cover the FMA latency at two per cycle; a group is 4 zmm, packed to
// nibbles with vpmovdb / vpmovwb instead of the ymm lane-crossing packs.
// Compiled with this path's flags only (CMakeLists.txt); nothing here instantiates a std:: template.
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace svdq::cpu::avx512 {
namespace {

typedef __m512 VecF;
constexpr int kLanes = 16;
constexpr int kMicroRows = 8;  // register tile: 8 rows x 2 vectors = 16 independent FMA chains
constexpr int kMicroVecs = 2;
// Rows sharing one pass over lora_down: 4 register tiles. At K = 12288 lora_down (2.4 MiB in bf16 at
// rank 96) does not fit L2, and 8-row tiles streamed it from L3 32 times per 256 rows: 32-row tiles cut the
// down projection's time there by a third (3.6 -> 3.0 ms for M = 256, rank 96), same at K = 3072.
constexpr int64_t kTileRows = 32;
// lora_down is read as it is (converted on the fly) instead of staged as float32 per tile: with zmm FMAs
// the staging costs more than the conversion it saves (3.2 vs 3.0 ms above).
constexpr bool kLoraInPlace = true;

// 16 consecutive elements of a `D` array, starting at element i, as float32.
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
inline __m512 vloadf(const float* p) { return _mm512_loadu_ps(p); }
inline void vstoref(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline __m512 vadd(__m512 a, __m512 b) { return _mm512_add_ps(a, b); }
inline __m512 vfma_bcast(const float* s, __m512 w, __m512 acc) {
  return _mm512_fmadd_ps(_mm512_set1_ps(*s), w, acc);
}

// One group. x: the group's first element (`D`); sm: float32 [64] smooth; xh: float32 [64] out
// (x̂); q: uint8 [32] out; returns the scale. The same IEEE operations as the ymm version.
static_assert(kGroupSize == 4 * kLanes, "quantize_group takes a group as 4 vectors");
template <DType D>
inline float quantize_group(const void* x, const float* sm, float* xh, uint8_t* q) {
  __m512 v[4];
  __m512 amax = _mm512_setzero_ps();
  for (int j = 0; j < 4; ++j) {
    v[j] = _mm512_div_ps(load_lanes<D>(x, 16 * j), _mm512_loadu_ps(sm + 16 * j));
    _mm512_storeu_ps(xh + 16 * j, v[j]);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
  }
  const float s = _mm512_reduce_max_ps(amax) / 7.0f;
  if (s == 0.0f) {  // all-zero group (or absmax/7 underflowed): codes 0, scale 0, no NaN
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    return s;
  }
  const __m512 sv = _mm512_set1_ps(s);
  const __m512 qmin = _mm512_set1_ps(-8.0f);
  const __m512 qmax = _mm512_set1_ps(7.0f);
  __m128i b[4];
  for (int j = 0; j < 4; ++j) {
    // Clamping before rounding equals rounding before clamping (the bounds are integers), and the
    // conversion's embedded rounding (nearest even) replaces a vrndscaleps.
    const __m512 r = _mm512_min_ps(qmax, _mm512_max_ps(qmin, _mm512_div_ps(v[j], sv)));
    b[j] = _mm512_cvtepi32_epi8(_mm512_cvt_roundps_epi32(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  // 64 code bytes in order; each 16-bit lane is (even code | odd code << 8): fold it into
  // (even & 15) | (odd & 15) << 4 and keep the low byte of every lane.
  const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(b[1], b[0])),
                                       _mm256_set_m128i(b[3], b[2]), 1);
  const __m512i nib = _mm512_or_si512(_mm512_and_si512(c, _mm512_set1_epi16(0x000f)),
                                      _mm512_and_si512(_mm512_srli_epi16(c, 4), _mm512_set1_epi16(0x00f0)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm512_cvtepi16_epi8(nib));
  return s;
}

}  // namespace

#include "quantize_x86.inc"

}  // namespace svdq::cpu::avx512
