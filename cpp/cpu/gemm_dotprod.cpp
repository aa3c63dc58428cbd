// Armv8.2-A dot-product (sdot: Apple M1+, Cortex-A76+, Neoverse N1+) W4A4 GEMM. Compiled with
// -march=armv8.2-a+dotprod only (CMakeLists.txt); dispatch.cpp runs it where HWCAP_ASIMDDP (Linux) or
// hw.optional.arm.FEAT_DotProd (macOS) says the CPU has it. quantize_act is quantize_neon.cpp's.
//
// The tile: 16 columns; per group 16 steps of 64 bytes, step s holding, for each column c, its 4 codes
// at split positions 4s .. 4s + 3 (gemm_neon_common.inc) in bytes 4c .. 4c + 3. One step is four vectors
// of 4 columns x 4 codes; `sdot v, w, x.4b[l]` multiplies each by the 4 activation codes in lane l of a
// row's 16-code vector, so the 32-bit lanes are columns and no horizontal sum is needed. The micro-kernel
// runs kRows rows x 16 columns: kRows x 4 int32 accumulators, one 16-byte activation load per row per 4
// steps, four weight loads per step shared by the rows. Per group and 4-column vector the other vector work
// is a copy of the sums' start value, a subtraction (the exact int -> float conversion, kMagic), the
// multiply s_x · s_w and an fma, against 16 sdot: benchmarks/bench_arm_mca.py.
#include <arm_neon.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::dotprod {

#include "gemm_neon_common.inc"

namespace {

// 2 rows: 8 int32 and 8 float accumulators, 2 activation and 4 weight vectors fit the 32 registers, so the
// float sums stay in registers over K (4 rows would keep them in memory, a load and a store each per group).
constexpr int kRows = 2;

// Rows in split order, K apart.
void prepare_rows(const uint8_t* q_x, int8_t* xs, int64_t M, int64_t K, int num_threads) {
  unpack_split(q_x, xs, M, K, num_threads);
}

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

// The integer sums of one group for 2 rows, in asm: from the same intrinsics GCC 12 keeps the sums in
// registers but adds a register move for every other sdot chain, 10% of the vector pipes. x0, x1: the rows'
// 64 codes in split order; w: the group's 1024 weight bytes; d[r * 4 + j]: row r, columns 4j .. 4j + 3,
// started from `base` (the magic bits, see kMagic) instead of 0.
#define SVDQ_DOT_ROW(XR, D0, D1, D2, D3, L)          \
  "sdot %[" D0 "].4s, %[w0].16b, %[" XR "].4b[" L "]\n\t" \
  "sdot %[" D1 "].4s, %[w1].16b, %[" XR "].4b[" L "]\n\t" \
  "sdot %[" D2 "].4s, %[w2].16b, %[" XR "].4b[" L "]\n\t" \
  "sdot %[" D3 "].4s, %[w3].16b, %[" XR "].4b[" L "]\n\t"
#define SVDQ_DOT_STEP(OFF, OFF32, L)                          \
  "ldp %q[w0], %q[w1], [%[w], #" OFF "]\n\t"                   \
  "ldp %q[w2], %q[w3], [%[w], #" OFF32 "]\n\t"                 \
  SVDQ_DOT_ROW("xa", "d0", "d1", "d2", "d3", L) SVDQ_DOT_ROW("xb", "d4", "d5", "d6", "d7", L)
#define SVDQ_DOT_QUAD(XOFF, O0, O1, O2, O3, O4, O5, O6, O7)                                  \
  "ldr %q[xa], [%[x0], #" XOFF "]\n\t"                                                       \
  "ldr %q[xb], [%[x1], #" XOFF "]\n\t"                                                       \
  SVDQ_DOT_STEP(O0, O1, "0") SVDQ_DOT_STEP(O2, O3, "1") SVDQ_DOT_STEP(O4, O5, "2") SVDQ_DOT_STEP(O6, O7, "3")

inline void group_sums_2rows(const int8_t* x0, const int8_t* x1, const int8_t* w, int32x4_t base,
                             int32x4_t (&d)[8]) {
  int8x16_t xa, xb, w0, w1, w2, w3;
  __asm__(
      "mov %[d0].16b, %[base].16b\n\tmov %[d1].16b, %[base].16b\n\tmov %[d2].16b, %[base].16b\n\t"
      "mov %[d3].16b, %[base].16b\n\tmov %[d4].16b, %[base].16b\n\tmov %[d5].16b, %[base].16b\n\t"
      "mov %[d6].16b, %[base].16b\n\tmov %[d7].16b, %[base].16b\n\t"
      SVDQ_DOT_QUAD("0", "0", "32", "64", "96", "128", "160", "192", "224")
      SVDQ_DOT_QUAD("16", "256", "288", "320", "352", "384", "416", "448", "480")
      SVDQ_DOT_QUAD("32", "512", "544", "576", "608", "640", "672", "704", "736")
      SVDQ_DOT_QUAD("48", "768", "800", "832", "864", "896", "928", "960", "992")
      : [d0] "=&w"(d[0]), [d1] "=&w"(d[1]), [d2] "=&w"(d[2]), [d3] "=&w"(d[3]), [d4] "=&w"(d[4]),
        [d5] "=&w"(d[5]), [d6] "=&w"(d[6]), [d7] "=&w"(d[7]), [xa] "=&w"(xa), [xb] "=&w"(xb), [w0] "=&w"(w0),
        [w1] "=&w"(w1), [w2] "=&w"(w2), [w3] "=&w"(w3)
      : [x0] "r"(x0), [x1] "r"(x1), [w] "r"(w), [base] "w"(base),
        "m"(*reinterpret_cast<const int8_t(*)[kGroupSize]>(x0)),
        "m"(*reinterpret_cast<const int8_t(*)[kGroupSize]>(x1)),
        "m"(*reinterpret_cast<const int8_t(*)[kTileBytes]>(w)));
}
#undef SVDQ_DOT_QUAD
#undef SVDQ_DOT_STEP
#undef SVDQ_DOT_ROW

// 1.5 · 2^23 (bits 0x4B400000): an int32 sum d with |d| < 2^22 started from these bits reads as the float
// 1.5 · 2^23 + d, so one exact subtraction converts it (scvtf is 2 uops on Neoverse N1/N2/V1).
constexpr float kMagic = 12582912.0f;

// One group's float work, generic's per element: acc = fma(float(sum), s_x · s_w, acc).
template <int MR>
inline void scale_group(float32x4_t (&acc)[MR][4], const float32x4_t (&sums)[MR][4], const float* sx, int64_t G,
                        const float* sw) {
  float32x4_t s[4];
  for (int j = 0; j < 4; ++j) s[j] = vld1q_f32(sw + 4 * j);
  for (int r = 0; r < MR; ++r) {
    const float sxr = sx[r * G];
    for (int j = 0; j < 4; ++j) acc[r][j] = vfmaq_f32(acc[r][j], sums[r][j], vmulq_n_f32(s[j], sxr));
  }
}

template <int MR>
void tile_rows(const int8_t* x, const float* sx, const GemmArgs& a, const int8_t* wq, const float* sw,
               float32x4_t (&acc_out)[MR][4]) {
  const int64_t G = a.K / kGroupSize, K = a.K;
  float32x4_t acc[MR][4];  // a local copy: registers for the whole K loop, never memory
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = acc_out[r][j];
  const float32x4_t magic = vdupq_n_f32(kMagic);
  for (int64_t g = 0; g < G; ++g) {
    const int8_t* w = wq + g * kTileBytes;
    float32x4_t sums[MR][4];
    if constexpr (MR == 2) {  // the full block: asm sums started from the magic bits
      SVDQ_MCA_MARK("LLVM-MCA-BEGIN group", acc[0][0], acc[0][1], acc[0][2], acc[0][3], acc[1][0], acc[1][1],
                    acc[1][2], acc[1][3]);
      int32x4_t d[8];
      group_sums_2rows(x + g * kGroupSize, x + K + g * kGroupSize, w, vreinterpretq_s32_f32(magic), d);
      for (int i = 0; i < 8; ++i) sums[i / 4][i % 4] = vsubq_f32(vreinterpretq_f32_s32(d[i]), magic);
      scale_group<MR>(acc, sums, sx + g, G, sw + g * kTileN);
      SVDQ_MCA_MARK("LLVM-MCA-END group", acc[0][0], acc[0][1], acc[0][2], acc[0][3], acc[1][0], acc[1][1],
                    acc[1][2], acc[1][3]);
    } else {  // a last single row: intrinsics
      int32x4_t d[MR][4];
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) d[r][j] = vdupq_n_s32(0);
      for (int u = 0; u < 4; ++u) {
        int8x16_t xv[MR];
        for (int r = 0; r < MR; ++r) xv[r] = vld1q_s8(x + r * K + g * kGroupSize + 16 * u);
        dot_step<MR, 0>(d, xv, w + (4 * u + 0) * 64);
        dot_step<MR, 1>(d, xv, w + (4 * u + 1) * 64);
        dot_step<MR, 2>(d, xv, w + (4 * u + 2) * 64);
        dot_step<MR, 3>(d, xv, w + (4 * u + 3) * 64);
      }
      for (int r = 0; r < MR; ++r)
        for (int j = 0; j < 4; ++j) sums[r][j] = vcvtq_f32_s32(d[r][j]);
      scale_group<MR>(acc, sums, sx + g, G, sw + g * kTileN);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc_out[r][j] = acc[r][j];
}

}  // namespace

#include "gemm_neon_driver.inc"

#define SVDQ_PEAK_INSN(a, w, x) "sdot %[" a "].4s, %[" w "].16b, %[" x "].4b[0]\n\t"
constexpr double kPeakOpsPerInsn = 32;
#include "peak_loop_neon.inc"
#undef SVDQ_PEAK_INSN

}  // namespace svdq::cpu::dotprod
