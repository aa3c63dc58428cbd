// AVX2 W4A4 GEMM (vpmaddubsw + vpmaddwd) on the tile layout of gemm_layout.h.
//
// Micro-kernel: kRowsPerBlock (4) activation rows x one 16-column tile. Per 64-group, 16 steps each
// load 64 bytes of signed weight codes (two vectors of 8 columns x 4 k) and broadcast 4 unsigned
// activation codes (q_x + 8) per row; vpmaddubsw (u8 x s8 -> pairs summed into s16) accumulates in
// 16-bit registers for the whole group, started at the tile's −8·Σq_w (|pair| <= 15·8·2 = 240,
// 16 steps -> <= 3840, plus |−8·Σq_w| <= 4096: no saturation), so the 32-bit widening (vpmaddwd
// with ones) and the float scaling run once per group, not per step. The weights are unpacked from
// nibbles when a tile is packed, not in the inner loop: the step is 2 loads, and per row a
// broadcast, 2 vpmaddubsw and 2 vpaddw, the same mix as the peak loop below.
// Registers: 8 s16 accumulators + 2 weight vectors + broadcast + product; the float accumulators
// live in a small array (touched once per group). The step is inline asm and tile_groups is never
// inlined (see there): GCC's schedule of the intrinsics spilled the accumulators, at ~60% of this speed.
// Six rows per block (12 accumulators) measured the same as four on Zen 3.
//
// Cache blocking: rows in chunks of ~192 KiB of codes (rows_per_chunk, stays in L2); per tile, K
// blocks of 16 groups (16 KiB of codes, stays in L1) run over every row block of the chunk.
// OpenMP over (panel of tiles, row range) items (gemm_x86.inc, gemm_w4a4): each thread packs the
// panels it runs (up to 8 tiles, ~1 MiB) from the canonical weights into its own buffer, with byte
// shuffles and 8x8 dword transposes, and sweeps its row chunks over them. Nothing layer-sized is
// allocated.
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx2 {

#include "gemm_x86.inc"

double int8_peak_ops(int num_threads, int64_t iters) {
  // The GEMM's inner step with nothing else: vpmaddubsw summed into s16 for 16 steps, then one
  // vpmaddwd widening to s32 (the kernel's per-group pattern), on operands already in registers.
  // 8 independent chains hide the latency; the asm body cannot be hoisted out of the loop.
  const int64_t outer = (iters + 15) / 16;
  int32_t sink = 0;
#pragma omp parallel num_threads(num_threads) reduction(+ : sink)
  {
    // 4 weight x 2 activation registers: 8 distinct products, one per chain.
    const __m256i w0 = _mm256_set1_epi8(1), w1 = _mm256_set1_epi8(2);
    const __m256i w2 = _mm256_set1_epi8(3), w3 = _mm256_set1_epi8(4);
    const __m256i x0 = _mm256_set1_epi8(-2), x1 = _mm256_set1_epi8(5);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[8];
    for (auto& v : acc) v = _mm256_setzero_si256();
    for (int64_t i = 0; i < outer; ++i) {
      __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
      // Written in asm: with intrinsics GCC computes the products of several steps ahead and
      // spills the accumulators, which measures the stack, not the multiplier.
      for (int k = 0; k < 16; ++k) {
        asm volatile(
            "vpmaddubsw %[x0], %[w0], %%ymm14\n\tvpaddw %%ymm14, %[s0], %[s0]\n\t"
            "vpmaddubsw %[x0], %[w1], %%ymm15\n\tvpaddw %%ymm15, %[s1], %[s1]\n\t"
            "vpmaddubsw %[x0], %[w2], %%ymm14\n\tvpaddw %%ymm14, %[s2], %[s2]\n\t"
            "vpmaddubsw %[x0], %[w3], %%ymm15\n\tvpaddw %%ymm15, %[s3], %[s3]\n\t"
            "vpmaddubsw %[x1], %[w0], %%ymm14\n\tvpaddw %%ymm14, %[s4], %[s4]\n\t"
            "vpmaddubsw %[x1], %[w1], %%ymm15\n\tvpaddw %%ymm15, %[s5], %[s5]\n\t"
            "vpmaddubsw %[x1], %[w2], %%ymm14\n\tvpaddw %%ymm14, %[s6], %[s6]\n\t"
            "vpmaddubsw %[x1], %[w3], %%ymm15\n\tvpaddw %%ymm15, %[s7], %[s7]\n\t"
            : [s0] "+x"(s0), [s1] "+x"(s1), [s2] "+x"(s2), [s3] "+x"(s3), [s4] "+x"(s4), [s5] "+x"(s5),
              [s6] "+x"(s6), [s7] "+x"(s7)
            : [w0] "x"(w0), [w1] "x"(w1), [w2] "x"(w2), [w3] "x"(w3), [x0] "x"(x0), [x1] "x"(x1)
            : "xmm14", "xmm15");
      }
      const __m256i s16[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
      for (int j = 0; j < 8; ++j) acc[j] = _mm256_add_epi32(acc[j], _mm256_madd_epi16(s16[j], ones));
    }
    __m256i s = acc[0];
    for (int j = 1; j < 8; ++j) s = _mm256_add_epi32(s, acc[j]);
    sink += _mm256_extract_epi32(s, 0);
  }
  // 32 u8 x s8 products and their 32 additions per vpmaddubsw: 64 ops, as a GEMM counts 2·M·N·K.
  // (sink only keeps the accumulators alive; it is 0 times anything.)
  return 64.0 * 8.0 * 16.0 * static_cast<double>(outer) * num_threads + 0.0 * sink;
}

}  // namespace svdq::cpu::avx2
