// Armv8.2-A dot-product (sdot: Apple M1+, Cortex-A76+, Neoverse N1+) W4A4 GEMM. Compiled with
// -march=armv8.2-a+dotprod only (CMakeLists.txt); dispatch.cpp runs it where HWCAP_ASIMDDP (Linux) or
// hw.optional.arm.FEAT_DotProd (macOS) says the CPU has it. quantize_act is quantize_neon.cpp's.
//
// The tile: 16 columns; per group 16 steps of 64 bytes, step s holding, for each column c, its 4 codes
// at split positions 4s .. 4s + 3 (gemm_neon_common.inc) in bytes 4c .. 4c + 3. One step is four vectors
// of 4 columns x 4 codes; `sdot v, w, x.4b[l]` multiplies each by the 4 activation codes in lane l of a
// row's 16-code vector, so the 32-bit lanes are columns and no horizontal sum is needed. The micro-kernel
// runs kRows rows x 16 columns: kRows x 4 int32 accumulators, one 16-byte activation load per row per 4
// steps, four weight loads per step shared by the rows.
#include <arm_neon.h>

#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::dotprod {

#include "gemm_neon_common.inc"

namespace {

#ifndef SVDQ_NEON_ROWS
#define SVDQ_NEON_ROWS 4
#endif
constexpr int kRows = SVDQ_NEON_ROWS;

void pack_codes(const GemmArgs& a, int64_t t, int8_t* wq) {
  const int64_t G = a.K / kGroupSize, KH = a.K / 2;
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = t * kTileN + c;
    for (int64_t g = 0; g < G; ++g) {
      alignas(16) int8_t col[kGroupSize] = {};  // the column's group in split order; padding columns 0
      if (n < a.N) {
        for (int h = 0; h < 2; ++h) {
          const int8x16_t b = vreinterpretq_s8_u8(vld1q_u8(a.qweight + n * KH + g * 32 + 16 * h));
          vst1q_s8(col + 32 * h, low_codes(b));
          vst1q_s8(col + 32 * h + 16, high_codes(b));
        }
      }
      for (int s = 0; s < 16; ++s) std::memcpy(wq + g * kTileBytes + s * 64 + c * 4, col + 4 * s, 4);
    }
  }
}

// One step (4 codes of each column): d[r][j] += columns 4j .. 4j + 3 times lane L of row r's codes.
template <int MR, int L>
inline void dot_step(int32x4_t (&d)[MR][4], const int8x16_t (&x)[MR], const int8_t* w) {
  const int8x16_t w0 = vld1q_s8(w), w1 = vld1q_s8(w + 16), w2 = vld1q_s8(w + 32), w3 = vld1q_s8(w + 48);
  for (int r = 0; r < MR; ++r) {
    d[r][0] = vdotq_laneq_s32(d[r][0], w0, x[r], L);
    d[r][1] = vdotq_laneq_s32(d[r][1], w1, x[r], L);
    d[r][2] = vdotq_laneq_s32(d[r][2], w2, x[r], L);
    d[r][3] = vdotq_laneq_s32(d[r][3], w3, x[r], L);
  }
}

template <int MR>
void tile_rows(const int8_t* x, const float* sx, const GemmArgs& a, const int8_t* wq, const float* sw,
               float32x4_t (&acc)[MR][4]) {
  const int64_t G = a.K / kGroupSize, K = a.K;
  for (int64_t g = 0; g < G; ++g) {
#ifdef SVDQ_MCA_MARKERS
    __asm__ volatile("// LLVM-MCA-BEGIN group");
#endif
    int32x4_t d[MR][4];
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < 4; ++j) d[r][j] = vdupq_n_s32(0);
    const int8_t* w = wq + g * kTileBytes;
#if defined(__clang__)
#pragma clang loop unroll(full)
#elif defined(__GNUC__)
#pragma GCC unroll 4
#endif
    for (int u = 0; u < 4; ++u) {
      int8x16_t xv[MR];
      for (int r = 0; r < MR; ++r) xv[r] = vld1q_s8(x + r * K + g * kGroupSize + 16 * u);
      dot_step<MR, 0>(d, xv, w + (4 * u + 0) * 64);
      dot_step<MR, 1>(d, xv, w + (4 * u + 1) * 64);
      dot_step<MR, 2>(d, xv, w + (4 * u + 2) * 64);
      dot_step<MR, 3>(d, xv, w + (4 * u + 3) * 64);
    }
    float32x4_t s[4];
    for (int j = 0; j < 4; ++j) s[j] = vld1q_f32(sw + g * kTileN + 4 * j);
    for (int r = 0; r < MR; ++r) {
      const float sxr = sx[r * G + g];
      for (int j = 0; j < 4; ++j) acc[r][j] = vfmaq_f32(acc[r][j], vcvtq_f32_s32(d[r][j]), vmulq_n_f32(s[j], sxr));
    }
#ifdef SVDQ_MCA_MARKERS
    __asm__ volatile("// LLVM-MCA-END group");
#endif
  }
}

}  // namespace

#include "gemm_neon_driver.inc"

}  // namespace svdq::cpu::dotprod
