// Armv8.6-A int8 matrix multiply (smmla: Apple M2+, Neoverse V1/N2/V2, Cortex-X2/A710+) W4A4 GEMM. Compiled
// with -march=armv8.2-a+dotprod+i8mm only (CMakeLists.txt); dispatch.cpp runs it where HWCAP2_I8MM (Linux) or
// hw.optional.arm.FEAT_I8MM (macOS) says the CPU has it. The few-rows path is the sdot one of
// gemm_neon_common.inc; quantize_act is quantize_neon.cpp's.
//
// `smmla d, a, b` adds a 2 x 8 by 8 x 2 int8 product to a 2 x 2 int32 block: 32 multiply-adds per
// instruction where sdot does 16, at the same issue rate on the cores that have both. The operands:
//   activations  row pairs: per 8 codes of K (a "chunk", split order), row 2p's 8 codes then row 2p + 1's,
//                16 bytes (prepare_rows; an odd last row is paired with zeros)
//   weights      per group, chunk q, column pair p: column 2p's 8 codes then column 2p + 1's, 16 bytes at
//                q * 128 + p * 16 (pack_codes)
// so one 16-byte load each is an smmla operand, and the result lanes are (row 0, col 2p), (row 0, col 2p + 1),
// (row 1, col 2p), (row 1, col 2p + 1). The micro-kernel runs 2 rows x 16 columns: 8 int32 and 8 float
// accumulators, per chunk one activation load and 8 weight loads for 8 smmla. The float work per group
// is generic's: fma(float(dot), s_x · s_w, acc) per element, the products s_w · s_x of 4 columns for each
// row interleaved into the 2 x 2 lane order with zip.
#include <arm_neon.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::i8mm {

#include "gemm_neon_common.inc"

namespace {

constexpr int kRows = 2;

// Row pairs interleaved per 8 codes (split order), pair p at xs + 2p * K; an odd last row gets a zero partner.
void prepare_rows(const uint8_t* q_x, int8_t* xs, int64_t M, int64_t K, int num_threads) {
  (void)num_threads;  // without OpenMP (Apple clang) the pragma below is all that reads it
  const int64_t pairs = (M + 1) / 2, KH = K / 2;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (M * K > (int64_t{1} << 16))
  for (int64_t p = 0; p < pairs; ++p) {
    const bool second = 2 * p + 1 < M;
    int8_t* dst = xs + 2 * p * K;
    for (int64_t i = 0; i < KH; i += 16) {  // 16 packed bytes: 32 k, 4 chunks
      const int8x16_t b0 = vreinterpretq_s8_u8(vld1q_u8(q_x + 2 * p * KH + i));
      const int8x16_t b1 = second ? vreinterpretq_s8_u8(vld1q_u8(q_x + (2 * p + 1) * KH + i)) : vdupq_n_s8(0);
      const int64x2_t l0 = vreinterpretq_s64_s8(low_codes(b0)), l1 = vreinterpretq_s64_s8(low_codes(b1));
      const int64x2_t h0 = vreinterpretq_s64_s8(high_codes(b0)), h1 = vreinterpretq_s64_s8(high_codes(b1));
      vst1q_s8(dst + 4 * i, vreinterpretq_s8_s64(vzip1q_s64(l0, l1)));
      vst1q_s8(dst + 4 * i + 16, vreinterpretq_s8_s64(vzip2q_s64(l0, l1)));
      vst1q_s8(dst + 4 * i + 32, vreinterpretq_s8_s64(vzip1q_s64(h0, h1)));
      vst1q_s8(dst + 4 * i + 48, vreinterpretq_s8_s64(vzip2q_s64(h0, h1)));
    }
  }
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
      int8_t* dst = wq + g * kTileBytes + (c / 2) * 16 + (c % 2) * 8;
      for (int q = 0; q < 8; ++q) std::memcpy(dst + q * 128, col + 8 * q, 8);
    }
  }
}

// The integer sums of one group for a row pair, in asm (GCC 12 moves registers around the intrinsics'
// accumulators): x the pair's 8 chunks (128 bytes), w the group's 1024 weight bytes, d[p] column pair p,
// started from `base` (the magic bits, see kMagic) instead of 0.
#define SVDQ_MM_HALF(OFF, OFF32, D0, D1, D2, D3)         \
  "ldp %q[w0], %q[w1], [%[w], #" OFF "]\n\t"            \
  "ldp %q[w2], %q[w3], [%[w], #" OFF32 "]\n\t"          \
  "smmla %[" D0 "].4s, %[xv].16b, %[w0].16b\n\t"          \
  "smmla %[" D1 "].4s, %[xv].16b, %[w1].16b\n\t"          \
  "smmla %[" D2 "].4s, %[xv].16b, %[w2].16b\n\t"          \
  "smmla %[" D3 "].4s, %[xv].16b, %[w3].16b\n\t"
#define SVDQ_MM_CHUNK(XOFF, O0, O1, O2, O3)                            \
  "ldr %q[xv], [%[x], #" XOFF "]\n\t" SVDQ_MM_HALF(O0, O1, "d0", "d1", "d2", "d3") \
      SVDQ_MM_HALF(O2, O3, "d4", "d5", "d6", "d7")

inline void group_sums_pair(const int8_t* x, const int8_t* w, int32x4_t base, int32x4_t (&d)[8]) {
  int8x16_t xv, w0, w1, w2, w3;
  __asm__(
      "mov %[d0].16b, %[base].16b\n\tmov %[d1].16b, %[base].16b\n\tmov %[d2].16b, %[base].16b\n\t"
      "mov %[d3].16b, %[base].16b\n\tmov %[d4].16b, %[base].16b\n\tmov %[d5].16b, %[base].16b\n\t"
      "mov %[d6].16b, %[base].16b\n\tmov %[d7].16b, %[base].16b\n\t"
      SVDQ_MM_CHUNK("0", "0", "32", "64", "96") SVDQ_MM_CHUNK("16", "128", "160", "192", "224")
      SVDQ_MM_CHUNK("32", "256", "288", "320", "352") SVDQ_MM_CHUNK("48", "384", "416", "448", "480")
      SVDQ_MM_CHUNK("64", "512", "544", "576", "608") SVDQ_MM_CHUNK("80", "640", "672", "704", "736")
      SVDQ_MM_CHUNK("96", "768", "800", "832", "864") SVDQ_MM_CHUNK("112", "896", "928", "960", "992")
      : [d0] "=&w"(d[0]), [d1] "=&w"(d[1]), [d2] "=&w"(d[2]), [d3] "=&w"(d[3]), [d4] "=&w"(d[4]),
        [d5] "=&w"(d[5]), [d6] "=&w"(d[6]), [d7] "=&w"(d[7]), [xv] "=&w"(xv), [w0] "=&w"(w0), [w1] "=&w"(w1),
        [w2] "=&w"(w2), [w3] "=&w"(w3)
      : [x] "r"(x), [w] "r"(w), [base] "w"(base), "m"(*reinterpret_cast<const int8_t(*)[2 * kGroupSize]>(x)),
        "m"(*reinterpret_cast<const int8_t(*)[kTileBytes]>(w)));
}
#undef SVDQ_MM_CHUNK
#undef SVDQ_MM_HALF

// 1.5 · 2^23 (bits 0x4B400000): an int32 sum d with |d| < 2^22 started from these bits reads as the float
// 1.5 · 2^23 + d, so one exact subtraction converts it (scvtf is 2 uops on Neoverse N2/V1).
constexpr float kMagic = 12582912.0f;

// MR = 1 (an odd last row) runs the same pair kernel; its zero partner's results are dropped.
template <int MR>
void tile_rows(const int8_t* x, const float* sx, const GemmArgs& a, const int8_t* wq, const float* sw,
               float32x4_t (&acc_out)[MR][4]) {
  const int64_t G = a.K / kGroupSize;
  float32x4_t acc[8];
  for (int p = 0; p < 8; ++p) acc[p] = vdupq_n_f32(0.0f);
  const float32x4_t magic = vdupq_n_f32(kMagic);
  for (int64_t g = 0; g < G; ++g) {
    SVDQ_MCA_MARK("LLVM-MCA-BEGIN group", acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
    int32x4_t d[8];
    group_sums_pair(x + g * 2 * kGroupSize, wq + g * kTileBytes, vreinterpretq_s32_f32(magic), d);
    // s_x · s_w per lane: (row 0, col 2p), (row 0, col 2p + 1), (row 1, col 2p), (row 1, col 2p + 1).
    const float sx0 = sx[g], sx1 = MR == 2 ? sx[G + g] : 0.0f;
    for (int j = 0; j < 4; ++j) {
      const float32x4_t s = vld1q_f32(sw + g * kTileN + 4 * j);
      const float64x2_t p0 = vreinterpretq_f64_f32(vmulq_n_f32(s, sx0));
      const float64x2_t p1 = vreinterpretq_f64_f32(vmulq_n_f32(s, sx1));
      const float32x4_t s0 = vreinterpretq_f32_f64(vzip1q_f64(p0, p1)), s1 = vreinterpretq_f32_f64(vzip2q_f64(p0, p1));
      acc[2 * j] = vfmaq_f32(acc[2 * j], vsubq_f32(vreinterpretq_f32_s32(d[2 * j]), magic), s0);
      acc[2 * j + 1] = vfmaq_f32(acc[2 * j + 1], vsubq_f32(vreinterpretq_f32_s32(d[2 * j + 1]), magic), s1);
    }
    SVDQ_MCA_MARK("LLVM-MCA-END group", acc[0], acc[1], acc[2], acc[3], acc[4], acc[5], acc[6], acc[7]);
  }
  for (int j = 0; j < 4; ++j) {  // pairs of column pairs -> rows of 4 columns
    const float64x2_t lo = vreinterpretq_f64_f32(acc[2 * j]), hi = vreinterpretq_f64_f32(acc[2 * j + 1]);
    acc_out[0][j] = vreinterpretq_f32_f64(vzip1q_f64(lo, hi));
    if constexpr (MR == 2) acc_out[MR - 1][j] = vreinterpretq_f32_f64(vzip2q_f64(lo, hi));
  }
}

}  // namespace

#include "gemm_neon_driver.inc"

#define SVDQ_PEAK_INSN(a, w, x) "smmla %[" a "].4s, %[" w "].16b, %[" x "].16b\n\t"
constexpr double kPeakOpsPerInsn = 64;
#include "peak_loop_neon.inc"
#undef SVDQ_PEAK_INSN

}  // namespace svdq::cpu::i8mm
