// The W4A16 linear on zmm vdpbf16ps (reference.linear_w4a16 with bfloat16 operands), for the many-row regime of
// the avx512bf16 path: CPUs with AVX512-BF16 but no AMX (AMD Zen 4 and Zen 5, Intel Cooper Lake), where the
// alternative, dequantized panels through torch's bfloat16 GEMM, measured 0.65–0.93x torch's bf16 F.linear at
// 16 and 256 rows on Zen 5 (the panels' round trip through memory on top of the same GEMM).
// Operands, numerics, blocking and driver: w4a16_bf16_driver.inc; here the engine. Per run, every m tile
// passes over the block's decoded A: C in registers, NR rows n × MZ m tiles (micro), per k pair MZ loads of B
// (16 m lanes, pairs of k) and NR broadcasts of A's pair, NR · MZ vdpbf16ps. m tiles go six at a time (NR = 4:
// 24 accumulators, 10 loads per 24 products), the rest as 16 × 1, 8 × 2, 8 × 3, 4 × 4 or 4 × 5, each with at
// least 16 accumulators to cover the product's latency.
//
// Compiled with the avx512bf16 path's flags only (CMakeLists.txt); dispatch.cpp enables it only when the CPU
// has AVX512-BF16 besides avx512vnni's features.
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx512bf16 {
namespace {

#include "w4a16_bf16_driver.inc"

// C rows row0 .. row0 + NR − 1 of the block (NR divides 16: one A tile) × m tiles 0 .. MZ − 1 (at b, c) over a
// run's steps; B step-major (MT m tiles per step, b_tile); C[MT][2][16 n][16 m]: row r, m tile z at
// c + (2 z + r / 16) · 256 + 16 (r % 16). Every load in the loop is one pointer plus a constant.
template <int NR, int MZ>
void micro(const uint16_t* ap, int64_t row0, const uint16_t* b, int64_t MT, int64_t steps, float* c, bool first) {
  const int64_t half = row0 / 16, i0 = row0 % 16;
  float* const cr = c + half * 256 + i0 * 16;
  __m512 acc[NR][MZ];
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) acc[r][z] = first ? _mm512_setzero_ps() : _mm512_load_ps(cr + z * 512 + r * 16);
  const uint16_t* as = ap + half * kTileWords + i0 * kStepK;
  const uint16_t* bs = b;
  for (int64_t s = 0; s < steps; ++s, as += 2 * kTileWords, bs += MT * kTileWords) {
#pragma GCC unroll 16
    for (int p = 0; p < 16; ++p) {
      __m512bh bv[MZ];
      for (int z = 0; z < MZ; ++z) bv[z] = (__m512bh)_mm512_loadu_si512(bs + z * kTileWords + 32 * p);
      for (int r = 0; r < NR; ++r) {
        const __m512bh av = (__m512bh)_mm512_broadcastd_epi32(_mm_loadu_si32(as + r * kStepK + 2 * p));
        for (int z = 0; z < MZ; ++z) acc[r][z] = _mm512_dpbf16_ps(acc[r][z], bv[z], av);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int z = 0; z < MZ; ++z) _mm512_store_ps(cr + z * 512 + r * 16, acc[r][z]);
}

// The block's 32 rows over MZ m tiles.
template <int NR, int MZ>
void rows(const uint16_t* ap, const uint16_t* b, int64_t MT, int64_t steps, float* c, bool first) {
  for (int64_t row0 = 0; row0 < kBlockRows; row0 += NR) micro<NR, MZ>(ap, row0, b, MT, steps, c, first);
}

// Measured on Zen 5 (2 threads, min of 8 runs): 8 steps per run and the codes prefetched 2 runs ahead, 3072 ->
// 18432 / 12288 -> 3072 at 16 rows 4.04 / 2.50 ms, against 4 steps 3.92 / 2.71 and 1 run ahead 4.64 / 2.76 (the
// codes of 32 rows K / 2 bytes apart are latency-bound when fetched late); at 256 rows 8 and 4 steps alike.
// 256 rows of 3072 -> 18432 in row blocks of 128 / 192 / 384 and K chunks of 512 / 896 KiB: 40.0–44.7 ms, within
// the machine's noise.
struct Engine {
  static constexpr int64_t kSteps = 8;              // tile steps per decoded run: A 16 KiB, B 8 KiB per m tile
  static constexpr int64_t kPrefetchRuns = 2;       // decode_a prefetches the codes two runs ahead
  static constexpr int64_t kXChunkBytes = 7 << 17;  // packed x̂ᵀ per K chunk: 7/8 of a core's L2 (1 MiB on Zen 5)
  static constexpr int64_t kMaxBlockRows = 384;     // rows per pass (linear_rows)
  static constexpr bool kStepMajor = true;          // a step's m tiles side by side: micro's loads at constant offsets
  static void begin() {}
  static void end() {}
  static void run(const uint16_t* ap, const uint16_t* b, int64_t /*S*/, int64_t MT, int64_t steps, float* c,
                  bool first) {
    int64_t j = 0;
    for (; j + 6 <= MT; j += 6) rows<4, 6>(ap, b + j * kTileWords, MT, steps, c + j * 512, first);
    const uint16_t* const bj = b + j * kTileWords;
    float* const cj = c + j * 512;
    switch (MT - j) {
      case 1: rows<16, 1>(ap, bj, MT, steps, cj, first); break;
      case 2: rows<8, 2>(ap, bj, MT, steps, cj, first); break;
      case 3: rows<8, 3>(ap, bj, MT, steps, cj, first); break;
      case 4: rows<4, 4>(ap, bj, MT, steps, cj, first); break;
      case 5: rows<4, 5>(ap, bj, MT, steps, cj, first); break;
      default: break;
    }
  }
};

}  // namespace

void linear_w4a16(const W4A16Args& a) { linear_rows<Engine>(a); }

}  // namespace svdq::cpu::avx512bf16
