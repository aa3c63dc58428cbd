// The W4A16 linear on AMX-BF16 tiles (reference.linear_w4a16 with bfloat16 operands), for the many-row
// regime of the amx path: the 4-bit weights are decoded into tiles on the fly, never into a dense copy.
//
//   C[n, m] = Σ_k W[n, k] · x̂[m, k] with _tile_dpbf16ps: W is the A operand (a tile is 16 rows n × 32 k; one
//   vpermw of a 32-entry bfloat16 table of q · s + m, a pair of groups' 16 each, decodes a tile row), x̂ᵀ the B
//   operand (16 k pairs × 16 m, packed once per call in VNNI order). The four steps of a pair of groups hold
//   k = 4 w + e (step e, position w) rather than 32 consecutive k: the order one 64-byte load of codes gives
//   (decode_a); B is packed in the same order. The low-rank branch rides along as extra K: lora_up as A
//   columns, lora_act as B rows. C is transposed on the way to y, + bias.
//
// Numerics (the bfloat16 panel path's, docs/design.md §4): x̂ = x / smooth in float32, then x̂, W = q · s + m
// (one fused multiply-add in float32), lora_act and lora_up are each rounded to bfloat16 (round to nearest
// even, vcvtne2ps2bf16: subnormal inputs are flushed to zero); products and sums in float32; y rounded once.
//
// Blocking: threads split N into blocks of 32 rows (two A tiles). Per block, K (with the lora columns) is cut
// into runs of kSteps tile steps (32 k each) whose decoded A (16 KiB) stays in L1 while every pair of m tiles
// (4 C tiles, 2 B tiles) passes over it; a run of at most 2 steps left at the end (the lora step) joins the run
// before it. B comes from L2 and is prefetched into L1 two steps ahead. When the packed x̂ᵀ of all of K does not
// fit in L2 (kXChunkBytes), K is also cut into chunks of that size, outermost, and C waits in memory between
// chunks. The threads take contiguous shares of the blocks. More than kMaxBlockRows rows run as equal blocks of
// rows, one pass each (linear_w4a16), so that C never waits in memory for a chunk's worth of the whole layer.
//
// Compiled with the amx path's flags only (CMakeLists.txt); dispatch.cpp enables it only when the CPU has
// AMX-BF16 and AVX512-BF16, the OS saves the tile state, and Linux granted this process the tile data.
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::amx {
namespace {

constexpr int64_t kStepK = 32;            // k per tile row: 64 bytes of bfloat16
constexpr int64_t kTileWords = 16 * 32;   // one 16 × 32 bfloat16 tile
constexpr int64_t kBlockRows = 32;        // n per decoded A panel: two A tiles
constexpr int64_t kSteps = 8;             // tile steps per decoded run: 2 × 8 KiB of A (4, 16: slower)
constexpr int64_t kXChunkBytes = 7 << 18;  // packed x̂ᵀ per K chunk: 7/8 of a core's L2 (2 MiB here)
constexpr int64_t kMaxBlockRows = 384;     // rows per pass (linear_w4a16)

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0, 1: A (W rows of the block's two halves); 2, 3: B (two m tiles); 4..7: C = (A0|A1) × (B2|B3).
void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

template <DType D>
inline __m512 load16(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  } else {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    if constexpr (D == DType::kBFloat16) {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
      return _mm512_cvtph_ps(h);
    }
  }
}

// Two float32 vectors as one vector of 32 bfloat16 (a's lanes first).
inline __m512i to_bf16(__m512 a, __m512 b) { return (__m512i)_mm512_cvtne2ps_pbh(b, a); }

// In-register transpose of 16 rows of 16 dwords: r[i] lane j <- r[j] lane i.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4 × 4 block; move the blocks: first across pairs of 128-bit lanes
  // (rows i, i + 4), then across 256-bit halves (rows i, i + 8).
  for (int i = 0; i < 4; ++i) {
    for (int h = 0; h < 2; ++h) {
      const __m512i a = r[i + 8 * h], b = r[i + 4 + 8 * h];
      t[i + 8 * h] = _mm512_shuffle_i32x4(a, b, 0x88);      // lanes 0, 2 of a, then of b
      t[i + 4 + 8 * h] = _mm512_shuffle_i32x4(a, b, 0xDD);  // lanes 1, 3
    }
  }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
  }
}

// The k of tile step s, position w (0 .. 31; a B tile row holds positions 2i, 2i + 1): s · 32 + w, except in the
// paired steps [0, paired_steps(K)), where the four steps 4b + e of the pair of groups b hold k = 128 b + 4 w + e
// (decode_a's order: one 64-byte load of codes, four nibble extractions).
inline int64_t paired_steps(int64_t K) { return K / (2 * kGroupSize) * 4; }

// 64 float32 of x̂ (four vectors, k = 16 j + i) regrouped by k mod 4: o[e] lane w = x̂[4 w + e]. A lane permutation
// within each vector (lane 4 e + w' <- 4 w' + e), then a 4 × 4 transpose of 128-bit lanes across the four.
inline void by_k_mod_4(const __m512 a[4], __m512 o[4]) {
  const __m512i idx = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  __m512 b[4];
  for (int j = 0; j < 4; ++j) b[j] = _mm512_permutexvar_ps(idx, a[j]);
  const __m512 t0 = _mm512_shuffle_f32x4(b[0], b[1], 0x44), t1 = _mm512_shuffle_f32x4(b[0], b[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(b[2], b[3], 0x44), t3 = _mm512_shuffle_f32x4(b[2], b[3], 0xEE);
  o[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  o[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  o[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  o[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// x̂ᵀ (and lora_actᵀ) of m tile j as B tiles: xb[(j · S + s) · 512 + 32 i + 2 c + e] = bfloat16 of x̂[16 j + c, k]
// (k < K; k of step s, position 2 i + e: paired_steps), lora_act[16 j + c, 32 s + 2 i + e − K] (K <= k < K + R), 0
// past M or K + R.
template <DType D>
void pack_x(const W4A16Args& a, int64_t j, int64_t S, uint16_t* xb) {
  const int64_t M = a.M, K = a.K, R = a.R, m0 = 16 * j, SP = paired_steps(K);
  // x̂ of row m, 16 values from k (0 past M).
  auto xhat = [&](int64_t m, int64_t k) {
    return m >= M ? _mm512_setzero_ps() : _mm512_div_ps(load16<D>(a.x, m * K + k), load16<D>(a.smooth, k));
  };
  auto store_step = [&](int64_t s, __m512i r[16]) {
    transpose16(r);
    for (int i = 0; i < 16; ++i) _mm512_storeu_si512(xb + (j * S + s) * kTileWords + 32 * i, r[i]);
  };
  for (int64_t s = 0; s < SP; s += 4) {  // a pair of groups: four steps at once
    __m512i r[4][16];
    for (int c = 0; c < 16; ++c) {
      __m512 o[2][4];
      for (int h = 0; h < 2; ++h) {
        __m512 v[4];
        for (int q = 0; q < 4; ++q) v[q] = xhat(m0 + c, s * 32 + 64 * h + 16 * q);
        by_k_mod_4(v, o[h]);
      }
      for (int e = 0; e < 4; ++e) r[e][c] = to_bf16(o[0][e], o[1][e]);
    }
    for (int e = 0; e < 4; ++e) store_step(s + e, r[e]);
  }
  for (int64_t s = SP; s < S; ++s) {
    const int64_t k = s * kStepK;
    __m512i r[16];
    for (int c = 0; c < 16; ++c) {
      const int64_t m = m0 + c;
      __m512 v[2];
      for (int h = 0; h < 2; ++h) {
        const int64_t kk = k + 16 * h;
        if (m >= M) {
          v[h] = _mm512_setzero_ps();
        } else if (kk < K) {
          v[h] = xhat(m, kk);
        } else {
          const int64_t i = kk - K;  // lora columns: R of them, zero padded to a whole step
          const __mmask16 valid = i >= R ? 0 : (R - i >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (R - i)) - 1));
          v[h] = _mm512_maskz_loadu_ps(valid, a.lora_act + m * R + i);
        }
      }
      r[c] = to_bf16(v[0], v[1]);
    }
    store_step(s, r);
  }
}

// Steps [s0, s1) of rows n0 .. n0 + 31 as A tiles: ap[(s − s0) · 1024 + 512 t + 32 i + w] = bfloat16 of W[n0 +
// 16 t + i, k] (s < K / 32; k of step s, position w: paired_steps) or lora_up[n0 + 16 t + i, 32 s + w − K] (zero
// past R); rows past N are zero. A pair of groups (64 code bytes) is one load: as 16-bit words, word w holds
// k = 4 w .. 4 w + 3 in its nibbles (words 0-15 group g, 16-31 group g + 1), and vpermw of the pair's 32-entry
// table (q · s + m of each group) by (word >> 4 e) & 0xF | 16 · (w >= 16) is step e's tile row: per 128 weights
// one load, three shifts, four vpternlogd and four vpermw, where a group at a time took four loads, vpmovzxbd and
// vpermw each (a vpermw per 32 weights either way, but half the port-5 work).
template <DType D>
void decode_a(const W4A16Args& a, int64_t n0, int64_t s0, int64_t s1, uint16_t* ap) {
  const int64_t N = a.N, K = a.K, R = a.R, G = K / kGroupSize, ks = K / kStepK, SP = paired_steps(K);
  const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i nib = _mm512_set1_epi16(0x000F);
  const __m512i second = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(0x0010), 1);  // words 16-31
  // q · s + m for q = 0 .. 15 of group i (of all N · G): one FMA.
  auto group_values = [&](int64_t i) {
    return _mm512_fmadd_ps(iota, _mm512_set1_ps(load_f32(a.wscales, i, D)), _mm512_set1_ps(load_f32(a.wmins, i, D)));
  };
  for (int64_t row = 0; row < kBlockRows; ++row) {
    const int64_t n = n0 + row;
    uint16_t* const out = ap + (row / 16) * kTileWords + (row % 16) * kStepK - s0 * 2 * kTileWords;
    if (n >= N) {
      for (int64_t s = s0; s < s1; ++s) _mm512_storeu_si512(out + s * 2 * kTileWords, _mm512_setzero_si512());
      continue;
    }
    // The row's codes of the block's next run (16 bytes a step), prefetched now: a run reads 32 rows K / 2 bytes
    // apart, a pattern the hardware prefetcher follows poorly at large K.
    for (int64_t s = s1; s < 2 * s1 - s0 && s < ks; s += 4)
      _mm_prefetch(reinterpret_cast<const char*>(a.qweight + n * (K / 2) + s * 16), _MM_HINT_T0);
    // Runs start on steps that are multiples of 8 and end on such a step or at the chunk's end: a pair's four
    // steps are always in one run, and so are a last single group's two.
    for (int64_t s = s0; s < s1 && s < SP; s += 4) {
      const int64_t g = s / 2;
      const __m512i table = to_bf16(group_values(n * G + g), group_values(n * G + g + 1));
      const __m512i v = _mm512_loadu_si512(a.qweight + n * (K / 2) + g * 32);
      for (int e = 0; e < 4; ++e) {
        const __m512i idx = _mm512_ternarylogic_epi32(e == 0 ? v : _mm512_srli_epi16(v, 4 * e), nib, second, 0xEA);
        _mm512_storeu_si512(out + (s + e) * 2 * kTileWords, _mm512_permutexvar_epi16(idx, table));
      }
    }
    for (int64_t s = max_i64(s0, SP); s < s1 && s < ks; s += 2) {  // the last group of an odd count
      const int64_t g = s / 2;
      const __m512 w = group_values(n * G + g);
      const __m512i table = to_bf16(w, w);  // 16 values, twice: the index's bit 4 does not matter
      for (int64_t h = 0; h < 2; ++h) {
        // dword i = byte i | byte i << 12: word 2i indexes by the low nibble, word 2i + 1 by the high one.
        const __m512i d = _mm512_cvtepu8_epi32(
            _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.qweight + n * (K / 2) + g * 32 + 16 * h)));
        _mm512_storeu_si512(out + (s + h) * 2 * kTileWords,
                            _mm512_permutexvar_epi16(_mm512_or_si512(d, _mm512_slli_epi32(d, 12)), table));
      }
    }
    for (int64_t s = max_i64(s0, ks); s < s1; ++s) {
      const int64_t i = (s - ks) * kStepK;
      alignas(64) float u[kStepK];
      for (int64_t c = 0; c < kStepK; ++c) u[c] = i + c < R ? load_f32(a.lora_up, n * R + i + c, D) : 0.0f;
      _mm512_storeu_si512(out + s * 2 * kTileWords, to_bf16(_mm512_load_ps(u), _mm512_load_ps(u + 16)));
    }
  }
}

// Steps of one decoded run on m tiles j (and j + 1 when MT = 2): C tiles from c (or zero), back into c.
// c holds [MT][2][16 n][16 m] float32 for these m tiles.
// The B tiles (1 KiB each, 16 lines) of step s + kBAhead are prefetched into L1 during step s: a tile load
// from L2 waits for the tile products still reading that tile register (tiles are not renamed), so its
// latency adds to every step. Past the run's last step, bn's (the next pair of m tiles) are prefetched.
inline void prefetch_tile(const uint16_t* t) {
  for (int l = 0; l < 16; ++l) _mm_prefetch(reinterpret_cast<const char*>(t) + 64 * l, _MM_HINT_T0);
}
constexpr int64_t kBAhead = 2;

template <int MT>
void run_tiles(const uint16_t* ap, const uint16_t* b, const uint16_t* bn, int64_t S, int64_t steps, float* c,
               bool first) {
  if (first) {
    _tile_zero(4);
    _tile_zero(5);
    if constexpr (MT == 2) {
      _tile_zero(6);
      _tile_zero(7);
    }
  } else {
    _tile_loadd(4, c, 64);
    _tile_loadd(5, c + 256, 64);
    if constexpr (MT == 2) {
      _tile_loadd(6, c + 512, 64);
      _tile_loadd(7, c + 768, 64);
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = s + kBAhead;
    const uint16_t* p = t < steps ? b + t * kTileWords : bn != nullptr ? bn + (t - steps) * kTileWords : nullptr;
    if (p != nullptr) {
      prefetch_tile(p);
      if (MT == 2) prefetch_tile(p + S * kTileWords);  // the pair's second m tile
    }
    _tile_loadd(0, ap + s * 2 * kTileWords, 64);
    _tile_loadd(1, ap + s * 2 * kTileWords + kTileWords, 64);
    _tile_loadd(2, b + s * kTileWords, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 1, 2);
    if constexpr (MT == 2) {
      _tile_loadd(3, b + (S + s) * kTileWords, 64);
      _tile_dpbf16ps(6, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, c, 64);
  _tile_stored(5, c + 256, 64);
  if constexpr (MT == 2) {
    _tile_stored(6, c + 512, 64);
    _tile_stored(7, c + 768, 64);
  }
}

// y[m, n0 .. n0 + 31] = Cᵀ + bias for the block's finished C ([MT][2][16 n][16 m]), rows past M / N left out.
template <DType D>
void store_block(const W4A16Args& a, int64_t n0, const float* c, const float* bias) {
  const int64_t M = a.M, N = a.N;
  for (int64_t j = 0; j * 16 < M; ++j) {
    for (int64_t t = 0; t < 2; ++t) {
      const int64_t nn = min_i64(16, N - n0 - 16 * t);
      if (nn <= 0) continue;
      const __mmask16 mask = static_cast<__mmask16>((1u << nn) - 1);
      __m512i r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_load_si512(c + (2 * j + t) * 256 + 16 * i);
      transpose16(r);
      const __m512 b = _mm512_load_ps(bias + 16 * t);
      for (int64_t i = 0; i < 16 && 16 * j + i < M; ++i) {
        const __m512 v = _mm512_add_ps(_mm512_castsi512_ps(r[i]), b);
        const int64_t at = (16 * j + i) * N + n0 + 16 * t;
        if constexpr (D == DType::kFloat32) {
          _mm512_mask_storeu_ps(static_cast<float*>(a.y) + at, mask, v);
        } else {
          const __m256i h = D == DType::kBFloat16 ? (__m256i)_mm512_cvtneps_pbh(v)
                                                   : _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
          _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.y) + at, mask, h);
        }
      }
    }
  }
}

template <DType D>
void linear_impl(const W4A16Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K;
  const int64_t MT = ceil_div(M, 16), S = K / kStepK + ceil_div(a.R, kStepK);
  const int64_t NB = ceil_div(N, kBlockRows);
  // K chunks of whole runs, as few as keep each chunk's packed x̂ᵀ within kXChunkBytes, of equal size.
  const int64_t runs = ceil_div(S, kSteps), run_bytes = MT * kTileWords * 2 * kSteps;
  const int64_t chunks = max_i64(1, min_i64(runs, ceil_div(runs * run_bytes, kXChunkBytes)));
  const int64_t chunk = ceil_div(runs, chunks) * kSteps;
  // A run ends kSteps on, or at the chunk's end when at most 2 steps more would be left (the lora step):
  // a short last run would load and store C for only a few tile products.
  auto run_end = [&](int64_t s0, int64_t c1) { return c1 - s0 <= kSteps + 2 ? c1 : s0 + kSteps; };
  const int nt = static_cast<int>(max_i64(1, min_i64(a.num_threads, NB)));
  const int64_t cwords = MT * 2 * 256, pwords = (kSteps + 2) * 2 * kTileWords;  // C, A panel of 32 rows
  // One workspace, kept by the calling thread between calls (fresh pages for C alone, 19 MiB at 256 rows of
  // FLUX's AdaLN in K chunks, cost more than a chunk saves): x̂ᵀ, C, the threads' A panels and biases.
  const int64_t xwords = MT * S * kTileWords, cfloats = (chunks > 1 ? NB : nt) * cwords;
  ReusedBuffer<uint16_t> work(xwords + 2 * cfloats + nt * pwords + 2 * nt * kBlockRows);
  uint16_t* const xb = work.p;
  float* const cbuf = reinterpret_cast<float*>(xb + xwords);
  uint16_t* const apanels = xb + xwords + 2 * cfloats;
  float* const biases = reinterpret_cast<float*>(apanels + nt * pwords);
#pragma omp parallel for num_threads(static_cast<int>(max_i64(1, min_i64(a.num_threads, MT)))) schedule(static)
  for (int64_t j = 0; j < MT; ++j) pack_x<D>(a, j, S, xb);
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_index();
    configure_tiles();
    uint16_t* const ap = apanels + tid * pwords;
    int64_t nb_lo, nb_hi;
    thread_share(NB, tid, nt, nb_lo, nb_hi);
    for (int64_t ch = 0; ch < chunks; ++ch) {
      const int64_t c0 = ch * chunk, c1 = min_i64(S, c0 + chunk);
      for (int64_t nb = nb_lo; nb < nb_hi; ++nb) {
        const int64_t n0 = nb * kBlockRows;
        float* const c = cbuf + (chunks > 1 ? nb : tid) * cwords;
        if (S == 0) std::memset(c, 0, cwords * sizeof(float));  // K = 0, no lora: y = bias
        for (int64_t s0 = c0, s1; s0 < c1; s0 = s1) {
          s1 = run_end(s0, c1);
          decode_a<D>(a, n0, s0, s1, ap);
          for (int64_t j = 0; j < MT; j += 2) {
            const uint16_t* b = xb + (j * S + s0) * kTileWords;
            const uint16_t* bn = j + 2 < MT ? b + 2 * S * kTileWords : nullptr;
            if (j + 1 < MT) {
              run_tiles<2>(ap, b, bn, S, s1 - s0, c + j * 512, s0 == 0);
            } else {
              run_tiles<1>(ap, b, bn, S, s1 - s0, c + j * 512, s0 == 0);
            }
          }
        }
        if (ch == chunks - 1) {
          float* const bias = biases + tid * kBlockRows;
          for (int64_t i = 0; i < kBlockRows; ++i)
            bias[i] = a.bias != nullptr && n0 + i < N ? load_f32(a.bias, n0 + i, D) : 0.0f;
          store_block<D>(a, n0, c, bias);
        }
      }
    }
    _tile_release();
  }
}

}  // namespace

void linear_w4a16(const W4A16Args& a) {
  if (a.M <= 0 || a.N <= 0) return;
  // Rows in equal blocks of at most kMaxBlockRows (whole m tiles), one pass each: the weights are decoded once
  // per block, and a block's C (rows × 32 per N block) never waits in memory. One pass over all rows would cut
  // K into chunks instead, with every C of the layer stored and reloaded per chunk (1024 rows of 3072 -> 18432:
  // 75 MB four times, 0.6x torch's bf16 GEMM).
  const int64_t blocks = ceil_div(a.M, kMaxBlockRows), rows = ceil_div(ceil_div(a.M, blocks), 32) * 32;
  const DType dt = static_cast<DType>(a.dtype);
  const LinearW4A16Fn impl = dt == DType::kFloat32    ? linear_impl<DType::kFloat32>
                             : dt == DType::kBFloat16 ? linear_impl<DType::kBFloat16>
                                                      : linear_impl<DType::kFloat16>;
  for (int64_t m0 = 0; m0 < a.M; m0 += rows) {
    W4A16Args b = a;
    b.M = min_i64(rows, a.M - m0);
    b.x = static_cast<const char*>(a.x) + m0 * a.K * dtype_size(dt);
    b.y = static_cast<char*>(a.y) + m0 * a.N * dtype_size(dt);
    if (a.lora_act != nullptr) b.lora_act = a.lora_act + m0 * a.R;
    impl(b);
  }
}

}  // namespace svdq::cpu::amx
