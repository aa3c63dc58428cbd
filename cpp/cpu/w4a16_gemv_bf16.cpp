// The few-rows W4A16 linear for bfloat16 input on the AVX-512 paths (avx512vnni, avx512bf16, amx; linear_w4a16_bf16):
// x̂ in 16-bit fixed point per group of 64, the 4-bit codes against its two bytes with vpdpbusd.
//
// Why: at few rows the decode and the multiply, not memory, bound a GEMV on this CPU class. The float32 GEMV
// (w4a16_x86.inc) spends about 13 vector uops per 64 weights on its shuffles; the vdpbf16ps GEMV this file held
// before spent four vdpbf16ps per 128 weights and row, and vdpbf16ps issues one per two cycles (15 cycles per
// 128 weights in an L1 loop). vpdpbusd issues two per cycle and multiplies 64 unsigned bytes by 64 signed
// ones, so the codes need no conversion at all: one vpandd (low nibbles), one vpsrlw + vpandd (high nibbles).
// x̂ is the signed operand, split into two bytes: per row and group of 64 (reference.quantize_fixed16),
// i = round(x̂ · 32639 / amax) in [-32639, 32639], step d = amax / 32639, and i = 256·h + l with h, l both
// int8 (32639 = 127·256 + 127 is the largest i whose two bytes are). Per pair of groups (64 code bytes, 128
// weights: one zmm) and row, with the low nibbles (even k) and the high nibbles (odd k) against x̂'s bytes
// arranged to match once per call:
//   t = (Σ q·h) << 8, then t += Σ q·l, over 8 k per dword lane (lanes 0-7 group g, 8-15 group g + 1),
// four vpdpbusd and a shift, exact in int32 (|t| ≤ 8·15·32639 < 2^22, so its float32 conversion is exact too),
// then acc += float(t) · (s·d) (s_g, d_g in lanes 0-7, s_g+1, d_g+1 in 8-15). After the column,
// Σ_g m_g·X_g with X_g = d_g·Σ i over the group (the same rounded x̂), vectorized over groups. About 8 cycles
// per 128 weights and row in an L1 loop, against 15 for vdpbf16ps.
//
// Numerics: y = Σ x̃·(q·s + m) + lora_act · lora_up + bias with x̃ = i·d, q, s, m exact (the layer's bfloat16),
// sums in float32; lora_act = x̂ · lora_down from the float32 x̂ (as the float32 kernel). x̃'s error is at most
// half a step, amax / 65278 (about amax · 2^-16) per element: finer than bfloat16's rounding of x̂ (2^-9 of each
// element) for every element above 1/128 of its group's largest, so the product errs less than a bfloat16
// nn.Linear's (docs/design.md §2, "Weight-only layers"). A group whose amax is below 2^-100 counts as zero; one
// with an infinite or NaN x̂ gets step NaN, so its rows' outputs are NaN. Every float tensor is bfloat16 (the
// binding only calls it so).
//
// Structure as the float32 kernel's (w4a16_x86.inc): one parallel region; each thread rounds and arranges its
// share of K's pairs of groups (and its partial lora_act); threads take contiguous shares of N's panels of 16
// columns; K blocks of pairs whose arranged x̂ (all rows) stays in L1; codes prefetched kPrefetchBytes ahead
// in reading order. Rows in register blocks of up to kMaxRows share each decoded vector. A panel's two halves
// are read side by side, column c of each together: two sequential streams of codes per thread, which DRAM
// feeds faster than one (measured: 32 MiB cold, 2 threads, 1.45 ms as one stream each, 1.13 ms as two).
//
// Compiled with the avx512vnni path's flags (CMakeLists.txt): AVX-512 F/BW and VNNI, nothing of AVX512-BF16.
#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx512 {
namespace {

constexpr int64_t kPairK = 2 * kGroupSize;     // k per pair of groups: 64 code bytes, one zmm
constexpr int64_t kPairBytes = 4 * 64;         // arranged x̂ of a pair and a row: 4 vectors of 64 int8
constexpr int kMaxRows = 4;                    // rows per register block
// Arranged x̂ and steps of a K block, every row: in L1 beside the codes. 32 KiB holds FLUX's K = 12288 at one row
// (96 pairs of 320 bytes) in one block: 24 KiB cut it into 76 + 20 pairs, each column read in two pieces far apart
// in time, and the cold call took 1.95 ms instead of 1.60.
constexpr int64_t kXBlockBytes = 32 * 1024;
constexpr int64_t kPanelCols = 16;
constexpr int64_t kPrefetchBytes = 4096;       // per stream; 1, 2, 8 and 16 KiB measured no better
constexpr float kFixedMax = 32639.0f;          // reference.FIXED16_MAX
constexpr float kFixedTiny = 0x1p-100f;        // reference.FIXED16_TINY

inline __m512 bf16x16(__m256i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)); }
inline __m512 load_bf16(const uint16_t* p) { return bf16x16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load_bf16(const uint16_t* p, int64_t n) {  // the first n < 16 elements, the rest 0
  return bf16x16(_mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << n) - 1), p));
}

// part[0, R) += Σ over the 64 k of a group of xk[k] · lora_down[k0 + k, 0 .. R), float32 FMAs (lora_down
// bfloat16). Up to 4 vectors of R at a time, even and odd k in separate chains; a scalar tail of R.
inline void lora_group(const float* xk, const uint16_t* lora_down, int64_t k0, int64_t R, float* part) {
  const int64_t Rv = R / 16 * 16;
  for (int64_t r0 = 0; r0 < Rv; r0 += 64) {
    const int nv = static_cast<int>(min_i64(4, (Rv - r0) / 16));
    __m512 e[4], o[4];
    for (int v = 0; v < nv; ++v) {
      e[v] = _mm512_loadu_ps(part + r0 + v * 16);
      o[v] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < kGroupSize; k += 2) {
      const __m512 x0 = _mm512_set1_ps(xk[k]), x1 = _mm512_set1_ps(xk[k + 1]);
      for (int v = 0; v < nv; ++v) {
        e[v] = _mm512_fmadd_ps(x0, load_bf16(lora_down + (k0 + k) * R + r0 + v * 16), e[v]);
        o[v] = _mm512_fmadd_ps(x1, load_bf16(lora_down + (k0 + k + 1) * R + r0 + v * 16), o[v]);
      }
    }
    for (int v = 0; v < nv; ++v) _mm512_storeu_ps(part + r0 + v * 16, _mm512_add_ps(e[v], o[v]));
  }
  for (int64_t r = Rv; r < R; ++r) {
    float t = part[r];
    for (int64_t k = 0; k < kGroupSize; ++k) t += xk[k] * bf16_to_f32(lora_down[(k0 + k) * R + r]);
    part[r] = t;
  }
}

#include "fixed16_ymm.inc"

// One group's x̂ (64 float32) in 16-bit fixed point (fixed16_codes): its two bytes per k into lo[0, 64) and
// hi[0, 64) (i = 256·hi + lo), and its step; returns Σ i.
inline int32_t fixed16_group(const float* xf, int8_t* lo, int8_t* hi, float* step) {
  alignas(64) int32_t iv[kGroupSize];
  const int32_t sum = fixed16_codes(xf, iv, step);
  for (int j = 0; j < 4; ++j) {
    const __m512i i = _mm512_load_si512(iv + 16 * j);
    const __m512i l = _mm512_srai_epi32(_mm512_slli_epi32(i, 24), 24);
    const __m512i h = _mm512_srai_epi32(_mm512_sub_epi32(i, l), 8);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(lo + 16 * j), _mm512_cvtepi32_epi8(l));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(hi + 16 * j), _mm512_cvtepi32_epi8(h));
  }
  return sum;
}

// acc[c][r] += Σ over pairs [0, np) of column c's float(t) · s·d (lanes: 8 per group), for NC columns read side
// by side (two streams of codes: from DRAM a core reads two sequential streams some 25% faster than one). q[c]:
// the codes of column c's first pair; s[c]: its bfloat16 scales from the first pair's first group; xb: arranged
// x̂ ([np][MR][4][64] int8), xd: steps ([np][MR][16] float32, 8 lanes per group); half: the last pair holds one
// group only (K/64 odd), its codes 32 bytes, its x̂ bytes and steps zero in lanes 8-15. pf[c] / pf_np[c]: the
// codes to prefetch for stream c, one line per pair.
template <int MR, int NC>
inline void column_pairs(const uint8_t* const* q, const uint16_t* const* s, const int8_t* xb, const float* xd,
                         int64_t np, bool half, const uint8_t* const* pf, const int64_t* pf_np,
                         __m512 (*acc)[kMaxRows]) {
  const __m512i nib = _mm512_set1_epi8(0x0F);
  // The dword (s_g | s_g+1 << 16), broadcast, -> float32 s_g in lanes 0-7, s_g+1 in lanes 8-15: one vpshufb
  // (its control differs per 128-bit lane), bytes 0-1 or 2-3 into bytes 2-3 of each dword, zeros below.
  const __m512i to_f32 = _mm512_set_epi32(0x03028080, 0x03028080, 0x03028080, 0x03028080, 0x03028080, 0x03028080,
                                          0x03028080, 0x03028080, 0x01008080, 0x01008080, 0x01008080, 0x01008080,
                                          0x01008080, 0x01008080, 0x01008080, 0x01008080);
  const int64_t full = half ? np - 1 : np;
  auto pair = [&](int64_t p, const __m512i* v, const __m512* sv) {
    __m512i lo[NC], hi[NC];
    for (int c = 0; c < NC; ++c) {
      lo[c] = _mm512_and_si512(v[c], nib);
      hi[c] = _mm512_and_si512(_mm512_srli_epi16(v[c], 4), nib);
    }
    const int8_t* xp = xb + p * MR * kPairBytes;
    const float* dp = xd + p * MR * 16;
    for (int r = 0; r < MR; ++r) {
      const int8_t* x = xp + r * kPairBytes;
      const __m512i le = _mm512_loadu_si512(x), lodd = _mm512_loadu_si512(x + 64);
      const __m512i he = _mm512_loadu_si512(x + 128), hodd = _mm512_loadu_si512(x + 192);
      const __m512 d = _mm512_loadu_ps(dp + r * 16);
      for (int c = 0; c < NC; ++c) {
        __m512i t = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], he);
        t = _mm512_slli_epi32(_mm512_dpbusd_epi32(t, hi[c], hodd), 8);
        t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(t, lo[c], le), hi[c], lodd);
        acc[c][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(sv[c], d), acc[c][r]);
      }
    }
  };
  for (int64_t p = 0; p < full; ++p) {
    __m512i v[NC];
    __m512 sv[NC];
    for (int c = 0; c < NC; ++c) {
      if (p < pf_np[c]) _mm_prefetch(reinterpret_cast<const char*>(pf[c] + p * 64), _MM_HINT_T0);
      v[c] = _mm512_loadu_si512(q[c] + p * 64);
      int32_t sd;
      std::memcpy(&sd, s[c] + 2 * p, 4);
      sv[c] = _mm512_castsi512_ps(_mm512_shuffle_epi8(_mm512_set1_epi32(sd), to_f32));
    }
    pair(p, v, sv);
  }
  if (half) {  // one group: 32 code bytes (the rest read as 0, against x̂ bytes 0), its scale in every lane
    const int64_t p = np - 1;
    __m512i v[NC];
    __m512 sv[NC];
    for (int c = 0; c < NC; ++c) {
      v[c] = _mm512_maskz_loadu_epi8(0xFFFFFFFFull, q[c] + p * 64);
      sv[c] = _mm512_set1_ps(bf16_to_f32(s[c][2 * p]));
    }
    pair(p, v, sv);
  }
}

}  // namespace

void linear_w4a16_bf16(const W4A16Args& a) {
  if (a.M <= 0 || a.N <= 0) return;
  const int64_t M = a.M, N = a.N, K = a.K, R = a.R, G = K / kGroupSize;
  const int64_t P = ceil_div(G, 2), Gp = ceil_div(G, 16) * 16, Rp = ceil_div(R, 16) * 16;
  const bool odd = G % 2 == 1;
  const auto* x = static_cast<const uint16_t*>(a.x);
  const auto* smooth = static_cast<const uint16_t*>(a.smooth);
  const auto* ws = static_cast<const uint16_t*>(a.wscales);
  const auto* wm = static_cast<const uint16_t*>(a.wmins);
  const auto* lora_up = static_cast<const uint16_t*>(a.lora_up);
  const auto* lora_down = static_cast<const uint16_t*>(a.lora_down);
  const auto* bias = static_cast<const uint16_t*>(a.bias);
  auto* y = static_cast<uint16_t*>(a.y);
  // Pairs per K block: arranged x̂ and steps of every row in kXBlockBytes, at least one; one (empty) block
  // when K = 0.
  const int64_t pb = max_i64(1, min_i64(P, kXBlockBytes / (M * (kPairBytes + 64))));
  const int64_t blocks = max_i64(1, ceil_div(P, pb)), panels = ceil_div(N, kPanelCols);
  const int nt = static_cast<int>(max_i64(1, min_i64(a.num_threads, panels)));
  const bool own_lora = R > 0 && a.lora_act == nullptr;
  // xa: arranged x̂ bytes, per register block of rows m0: [P][rows][4][64] from m0 · P · kPairBytes; xd: its
  // steps, [P][rows][16] from m0 · P · 16. xs: X_g per row (zero beyond G). la: lora_act zero-padded to Rp.
  Buffer<int8_t> xa(M * P * kPairBytes);
  Buffer<float> xd(M * P * 16), xs(M * Gp), la(M * Rp);
  for (int64_t i = 0; i < M * Gp; ++i) xs.p[i] = 0.0f;
  // Per thread: the panel's waiting accumulators, and with own_lora its partial lora_act [M, Rp].
  const int64_t waits = blocks > 1 ? kPanelCols * M * 16 : 0;
  const int64_t per_thread = waits + (own_lora ? M * Rp : 0);
  Buffer<float> scratch(nt * per_thread);
  const int64_t ahead = max_i64(1, ceil_div(kPrefetchBytes, pb * 64));
#pragma omp parallel num_threads(nt)
  {
    const int tid = thread_index();
    float* const wait = scratch.p + tid * per_thread;
    float* const part = wait + waits;
    // 1. x̂ = x / smooth (float32, IEEE division) of this thread's share of the pairs, every row: in fixed
    //    point, arranged, and X_g; with own_lora, partial lora_act from the float32 x̂.
    int64_t p_lo, p_hi;
    thread_share(P, tid, nt, p_lo, p_hi);
    if (own_lora)
      for (int64_t i = 0; i < M * Rp; ++i) part[i] = 0.0f;
    alignas(64) float xf[kGroupSize];
    alignas(64) int8_t lo[kPairK], hi[kPairK];
    float step[2];
    for (int64_t m = 0; m < M; ++m) {
      const int64_t m0 = m / kMaxRows * kMaxRows, rows = min_i64(kMaxRows, M - m0);
      for (int64_t p = p_lo; p < p_hi; ++p) {
        const int64_t ng = min_i64(2, G - 2 * p);
        for (int64_t g = 0; g < ng; ++g) {
          const int64_t k0 = (2 * p + g) * kGroupSize;
          for (int j = 0; j < 4; ++j)
            _mm512_store_ps(xf + 16 * j,
                            _mm512_div_ps(load_bf16(x + m * K + k0 + 16 * j), load_bf16(smooth + k0 + 16 * j)));
          const int32_t sum = fixed16_group(xf, lo + g * kGroupSize, hi + g * kGroupSize, step + g);
          xs.p[m * Gp + 2 * p + g] = step[g] * static_cast<float>(sum);
          if (own_lora) lora_group(xf, lora_down, k0, R, part + m * Rp);
        }
        if (ng == 1) {
          std::memset(lo + kGroupSize, 0, kGroupSize);
          std::memset(hi + kGroupSize, 0, kGroupSize);
          step[1] = 0.0f;
        }
        // Code byte b of the pair holds k = 2b (low nibble) and 2b + 1 (high nibble).
        int8_t* o = xa.p + (m0 * P + p * rows + (m - m0)) * kPairBytes;
        for (int b = 0; b < 64; ++b) {
          o[b] = lo[2 * b];
          o[64 + b] = lo[2 * b + 1];
          o[128 + b] = hi[2 * b];
          o[192 + b] = hi[2 * b + 1];
        }
        float* d = xd.p + (m0 * P + p * rows + (m - m0)) * 16;
        for (int i = 0; i < 16; ++i) d[i] = step[i / 8];
      }
    }
#pragma omp barrier
    // lora_act, zero-padded to Rp: each thread sums a share of it over the threads' parts, in thread order.
    gather_lora_act(own_lora ? scratch.p + waits : nullptr, per_thread, a.lora_act, M, R, Rp, tid, nt, la.p);
#pragma omp barrier
    // 2. This thread's panels; per panel, K blocks; per block and column, the codes streamed once.
    int64_t n_lo, n_hi;
    thread_share(panels, tid, nt, n_lo, n_hi);
    for (int64_t pn = n_lo; pn < n_hi; ++pn) {
      const int64_t n0 = pn * kPanelCols, n1 = min_i64(N, n0 + kPanelCols);
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t p0 = b * pb, np = min_i64(pb, P - p0);
        const bool first = b == 0, last = b == blocks - 1;
        const bool half = odd && p0 + np == P;
        // Two streams: columns [n0, n0 + h) and [n0 + h, n1), read side by side (the last of an odd count alone).
        const int64_t h = ceil_div(n1 - n0, 2);
        for (int64_t c = 0; c < h; ++c) {
          const int nc = n0 + h + c < n1 ? 2 : 1;
          int64_t ns[2], pf_np[2];
          const uint8_t *q[2], *pf[2];
          const uint16_t* s[2];
          for (int t = 0; t < nc; ++t) {
            ns[t] = n0 + t * h + c;
            int64_t col, bb;
            const bool more = piece_ahead(N, kPanelCols, n_hi, blocks, pn, b, c, t, ahead, col, bb);
            pf[t] = more ? a.qweight + col * (K / 2) + bb * pb * 64 : a.qweight;
            pf_np[t] = more ? min_i64(pb, P - bb * pb) : 0;
            q[t] = a.qweight + ns[t] * (K / 2) + p0 * 64;
            s[t] = ws + ns[t] * G + 2 * p0;
          }
          for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
            with_row_count<kMaxRows>(min_i64(kMaxRows, M - m0), [&](auto rows_c) {
              constexpr int MR = decltype(rows_c)::value;
              __m512 acc[2][kMaxRows];
              for (int t = 0; t < nc; ++t) {
                const float* w = wait + ((ns[t] - n0) * M + m0) * 16;
                for (int r = 0; r < MR; ++r) acc[t][r] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(w + r * 16);
              }
              const int8_t* xb = xa.p + (m0 * P + p0 * MR) * kPairBytes;
              const float* xdb = xd.p + (m0 * P + p0 * MR) * 16;
              if (nc == 2)
                column_pairs<MR, 2>(q, s, xb, xdb, np, half, pf, pf_np, acc);
              else
                column_pairs<MR, 1>(q, s, xb, xdb, np, half, pf, pf_np, acc);
              for (int t = 0; t < nc; ++t) {
                const int64_t n = ns[t];
                if (!last) {
                  float* w = wait + ((n - n0) * M + m0) * 16;
                  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(w + r * 16, acc[t][r]);
                  continue;
                }
                // Σ_g m_g X_g, lora_act · lora_up, lane-wise; one horizontal sum; + bias.
                for (int64_t g = 0; g < G; g += 16) {
                  const int64_t cnt = min_i64(16, G - g);
                  const __m512 mn = cnt == 16 ? load_bf16(wm + n * G + g) : load_bf16(wm + n * G + g, cnt);
                  for (int r = 0; r < MR; ++r)
                    acc[t][r] = _mm512_fmadd_ps(mn, _mm512_loadu_ps(xs.p + (m0 + r) * Gp + g), acc[t][r]);
                }
                for (int64_t i = 0; i < Rp; i += 16) {
                  const __m512 lu =
                      R - i >= 16 ? load_bf16(lora_up + n * R + i) : load_bf16(lora_up + n * R + i, R - i);
                  for (int r = 0; r < MR; ++r)
                    acc[t][r] = _mm512_fmadd_ps(_mm512_loadu_ps(la.p + (m0 + r) * Rp + i), lu, acc[t][r]);
                }
                const float bv = bias != nullptr ? bf16_to_f32(bias[n]) : 0.0f;
                for (int r = 0; r < MR; ++r)
                  y[(m0 + r) * N + n] = f32_to_bf16(_mm512_reduce_add_ps(acc[t][r]) + bv);
              }
            });
          }
        }
      }
    }
  }
}

}  // namespace svdq::cpu::avx512
