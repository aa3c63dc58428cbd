// AVX2 + FMA + F16C kernels. This is the only file built with -mavx2 -mfma -mf16c; the
// dispatcher calls into it only after cpuid and XCR0 say the CPU and OS support those.
//
// Layout (see kernels.h): x [M, K] row-major in `dtype`, smooth [K], lora_down [K, R] row-major;
// q_x uint8 [M, K/2] (element 2j low nibble, 2j+1 high nibble), s_x float32 [M, K/64],
// lora_act float32 [M, R].
//
// Numerics equal generic.cpp / reference.quantize_act bit for bit for q_x and s_x: every step
// of the quantization is an exactly rounded IEEE operation (vdivps, vmaxps, vroundps to nearest
// even), so vector and scalar agree. Only lora_act's summation order differs.
//
// Work decomposition, per OpenMP thread:
//
//   rows   m0 ........ m0+mt          (a tile of mt <= kTileRows rows)
//   K      |-- kBlockK --|-- kBlockK --| ...
//          1. quantize the tile's groups in this K block, leaving x̂ in xh [mt, kBlockK]
//             (L1-resident, so x is read from memory exactly once)
//          2. convert lora_down[block, :] to float32 w [kBlockK, Rp], Rp = R rounded up to 8
//             with zero columns, so the micro-kernel never needs a column tail. Skipped when
//             R % 8 == 0 and lora_down is float32 or the tile is a single register tile (few
//             rows): then the micro-kernel reads lora_down directly, converting on the fly.
//          3. acc[mt, Rp] += xh @ w, in register tiles of kMicroRows rows x 16 (or 8) columns
//
// lora_down is thus read once per tile rather than once per row, and converted once per tile.
// Threads split M only: a single row runs on one thread.
//
// Nothing in here may instantiate a std:: template or any other inline function with external
// linkage: the linker could keep this AVX2-compiled copy for the generic path too. Helpers live
// in an anonymous namespace; scratch memory is scalar.h's Buffer (plain aligned_alloc).

#include <immintrin.h>

#include <cstring>

#include "kernels.h"
#include "scalar.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace svdq::cpu::avx2 {
namespace {

// Measured on Zen 3 (single thread, K = 12288, R = 32): 1.3 ns per element of x, about 0.45
// for the quantization (bound by the two vdivps per vector) and 0.85 for the down projection
// (near the 2-FMA/cycle peak). Other tilings (12/6x2, 16/2x4, 32/4x3, K blocks of 128/512)
// were within noise or slower.
constexpr int64_t kTileRows = 16;  // rows sharing one pass over lora_down
constexpr int64_t kBlockK = 256;   // xh (16 KiB) and staged w (32 KiB at R = 32) stay in L1/L2
constexpr int kMicroRows = 4;      // register tile: 4 rows x 2 vectors = 8 independent FMA chains
constexpr int kMicroVecs = 2;

static_assert(kBlockK % kGroupSize == 0, "a K block holds whole groups");

// 8 consecutive elements of a `D` array, starting at element i, as float32.
template <DType D>
inline __m256 load8(const void* p, int64_t i) {
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

template <DType D>
inline float load1(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::kBFloat16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return _cvtsh_ss(static_cast<const uint16_t*>(p)[i]);
  }
}

constexpr size_t elem_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// 64 int32 codes in [-8, 7] (c[j] holds elements 8j..8j+7) -> 32 packed bytes.
inline void pack_group(const __m256i c[8], uint8_t* q) {
  // packs_* work within 128-bit lanes; this permutation puts the 4-byte runs back in order.
  const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i b0 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3])), fix);
  const __m256i b1 = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(c[4], c[5]), _mm256_packs_epi32(c[6], c[7])), fix);
  // Each 16-bit lane is (even code | odd code << 8); fold it into (even & 15) | (odd & 15) << 4.
  const __m256i lo = _mm256_set1_epi16(0x000f);
  const __m256i hi = _mm256_set1_epi16(0x00f0);
  const __m256i r0 =
      _mm256_or_si256(_mm256_and_si256(b0, lo), _mm256_and_si256(_mm256_srli_epi16(b0, 4), hi));
  const __m256i r1 =
      _mm256_or_si256(_mm256_and_si256(b1, lo), _mm256_and_si256(_mm256_srli_epi16(b1, 4), hi));
  // packus interleaves the 64-bit halves of r0 and r1 per lane; 0xD8 = quads (0, 2, 1, 3).
  const __m256i out = _mm256_permute4x64_epi64(_mm256_packus_epi16(r0, r1), 0xD8);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), out);
}

// One group. x: the group's first element (`D`); sm: float32 [64] smooth; xh: float32 [64] out
// (x̂); q: uint8 [32] out; returns the scale.
template <DType D>
inline float quantize_group(const void* x, const float* sm, float* xh, uint8_t* q) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 v[8];
  __m256 amax = _mm256_setzero_ps();
  for (int j = 0; j < 8; ++j) {
    v[j] = _mm256_div_ps(load8<D>(x, 8 * j), _mm256_loadu_ps(sm + 8 * j));
    _mm256_storeu_ps(xh + 8 * j, v[j]);
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[j]));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  const float s = _mm_cvtss_f32(m) / 7.0f;
  if (s == 0.0f) {  // all-zero group (or absmax/7 underflowed): codes 0, scale 0, no NaN
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_setzero_si256());
    return s;
  }
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 qmin = _mm256_set1_ps(-8.0f);
  const __m256 qmax = _mm256_set1_ps(7.0f);
  __m256i c[8];
  for (int j = 0; j < 8; ++j) {
    __m256 r = _mm256_round_ps(_mm256_div_ps(v[j], sv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_min_ps(qmax, _mm256_max_ps(qmin, r));
    c[j] = _mm256_cvtps_epi32(r);  // exact: r is an integer in [-8, 7]
  }
  pack_group(c, q);
  return s;
}

// lora_down rows [k0, k0 + kn) -> w float32 [kn, Rp], columns R..Rp-1 zero.
template <DType D>
void stage_lora(const void* ld, int64_t k0, int64_t kn, int64_t R, int64_t Rp, float* w) {
  for (int64_t k = 0; k < kn; ++k) {
    const int64_t src = (k0 + k) * R;
    float* dst = w + k * Rp;
    int64_t r = 0;
    for (; r + 8 <= R; r += 8) _mm256_storeu_ps(dst + r, load8<D>(ld, src + r));
    for (; r < R; ++r) dst[r] = load1<D>(ld, src + r);
    for (; r < Rp; ++r) dst[r] = 0.0f;
  }
}

// acc[t, 0:8*NV] += sum_k xh[t, k] * w[k, 0:8*NV] for t < RT, k < kn.
// xh: float32 [RT, xs]; w: `WD` [kn, ws] (float32 when staged, else lora_down itself);
// acc: float32 [RT, as].
template <int RT, int NV, DType WD>
inline void lora_micro(const float* xh, int64_t xs, const void* w, int64_t ws, int64_t kn, float* acc,
                       int64_t as) {
  __m256 a[RT][NV];
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NV; ++j) a[t][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < kn; ++k) {
    __m256 wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load8<WD>(w, k * ws + 8 * j);
    for (int t = 0; t < RT; ++t) {
      const __m256 b = _mm256_broadcast_ss(xh + t * xs + k);
      for (int j = 0; j < NV; ++j) a[t][j] = _mm256_fmadd_ps(b, wv[j], a[t][j]);
    }
  }
  for (int t = 0; t < RT; ++t)
    for (int j = 0; j < NV; ++j) {
      float* p = acc + t * as + 8 * j;
      _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), a[t][j]));
    }
}

// All Rp columns for RT rows. Few rows get more column vectors so that there are still enough
// independent FMA chains (latency 4 x 2 ports) to keep both FMA units busy.
template <int RT, DType WD>
void lora_rows(const float* xh, int64_t xs, const void* w, int64_t ws, int64_t Rp, int64_t kn, float* acc,
               int64_t as) {
  constexpr int NV = RT <= 2 ? 4 : kMicroVecs;
  constexpr size_t es = elem_size(WD);
  const char* wc = static_cast<const char*>(w);
  int64_t c = 0;
  for (; c + 8 * NV <= Rp; c += 8 * NV) lora_micro<RT, NV, WD>(xh, xs, wc + c * es, ws, kn, acc + c, as);
  for (; c < Rp; c += 8) lora_micro<RT, 1, WD>(xh, xs, wc + c * es, ws, kn, acc + c, as);
}

// The last rows < kMicroRows rows of a tile: picks lora_rows<rows> at compile time.
template <int N, DType WD>
inline void lora_rest(int64_t rows, const float* xh, int64_t xs, const void* w, int64_t ws, int64_t Rp,
                      int64_t kn, float* acc) {
  if constexpr (N > 0) {
    if (rows == N) return lora_rows<N, WD>(xh, xs, w, ws, Rp, kn, acc, Rp);
    lora_rest<N - 1, WD>(rows, xh, xs, w, ws, Rp, kn, acc);
  }
}

// acc[0:mt, :] += xh[0:mt, 0:kn] @ w, the register tiles over the rows of the tile.
template <DType WD>
void lora_tile(const float* xh, int64_t xs, const void* w, int64_t ws, int64_t Rp, int64_t kn, int64_t mt,
               float* acc) {
  int64_t t = 0;
  for (; t + kMicroRows <= mt; t += kMicroRows)
    lora_rows<kMicroRows, WD>(xh + t * xs, xs, w, ws, Rp, kn, acc + t * Rp, Rp);
  lora_rest<kMicroRows - 1, WD>(mt - t, xh + t * xs, xs, w, ws, Rp, kn, acc + t * Rp);
}

// One tile of mt rows starting at m0. sm: float32 [K]. Scratch: xh [kTileRows, kBlockK],
// w [kBlockK, Rp], acc [kTileRows, Rp].
template <DType D>
void quantize_tile(const void* x, const float* sm, const void* lora_down, uint8_t* q_x, float* s_x,
                   float* lora_act, int64_t m0, int64_t mt, int64_t K, int64_t R, int64_t Rp, float* xh,
                   float* w, float* acc) {
  constexpr size_t es = elem_size(D);
  if (R > 0) std::memset(acc, 0, static_cast<size_t>(mt * Rp) * sizeof(float));

  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    const int64_t kn = min_i64(kBlockK, K - k0);
    for (int64_t t = 0; t < mt; ++t) {
      const int64_t m = m0 + t;
      const char* xrow = static_cast<const char*>(x) + static_cast<size_t>(m * K) * es;
      if (k0 + kBlockK < K) {
        // The tile reads mt interleaved row streams; ask for this row's next block now so it
        // arrives from DRAM while the rest of this block (and its down projection) runs.
        const char* next = xrow + static_cast<size_t>(k0 + kBlockK) * es;
        const int64_t bytes = min_i64(kBlockK, K - k0 - kBlockK) * static_cast<int64_t>(es);
        for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
      }
      for (int64_t g = 0; g < kn; g += kGroupSize) {
        const int64_t k = k0 + g;
        s_x[m * (K / kGroupSize) + k / kGroupSize] = quantize_group<D>(
            xrow + static_cast<size_t>(k) * es, sm + k, xh + t * kBlockK + g, q_x + m * (K / 2) + k / 2);
      }
    }
    if (R == 0) continue;
    if (R % 8 == 0 && (D == DType::kFloat32 || mt <= kMicroRows)) {
      // lora_down already has a layout the micro-kernel reads; with a single register tile of
      // rows each element is converted once either way, so staging would only add a copy.
      lora_tile<D>(xh, kBlockK, static_cast<const char*>(lora_down) + static_cast<size_t>(k0 * R) * es, R, R,
                   kn, mt, acc);
    } else {
      stage_lora<D>(lora_down, k0, kn, R, Rp, w);
      lora_tile<DType::kFloat32>(xh, kBlockK, w, Rp, Rp, kn, mt, acc);
    }
  }
  for (int64_t t = 0; t < mt; ++t)
    if (R > 0) std::memcpy(lora_act + (m0 + t) * R, acc + t * Rp, static_cast<size_t>(R) * sizeof(float));
}

template <DType D>
void quantize_act_impl(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                       float* lora_act, int64_t M, int64_t K, int64_t R, int num_threads) {
  // Tiles of at most kTileRows rows, sized so that every thread gets the same number of tiles
  // (static schedule): M = 257 on 2 threads is 18 tiles of 15 rows (135 + 122 rows), not 17 of
  // 16 (144 + 113). Small M shrinks the tile so every thread still gets rows.
  const int64_t tiles_per_thread = ceil_div(M, num_threads * kTileRows);
  const int64_t mt = ceil_div(M, num_threads * tiles_per_thread);
  const int64_t ntiles = ceil_div(M, mt);
  const int nt = static_cast<int>(min_i64(num_threads, ntiles));
  const int64_t Rp = (R + 7) / 8 * 8;

  Buffer<float> sm(K);
  for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(sm.p + k, load8<D>(smooth, k));  // K % 64 == 0

  const int64_t xh_n = kTileRows * kBlockK;
  const int64_t w_n = kBlockK * Rp;
  const int64_t acc_n = kTileRows * Rp;
  const int64_t per_thread = (xh_n + w_n + acc_n + 15) / 16 * 16;  // keep each thread's slice 64-byte aligned
  Buffer<float> scratch(per_thread * nt);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t tile = 0; tile < ntiles; ++tile) {
#ifdef _OPENMP
    const int tid = omp_get_thread_num();
#else
    const int tid = 0;
#endif
    float* base = scratch.p + tid * per_thread;
    const int64_t m0 = tile * mt;
    quantize_tile<D>(x, sm.p, lora_down, q_x, s_x, lora_act, m0, min_i64(mt, M - m0), K, R, Rp, base,
                     base + xh_n, base + xh_n + w_n);
  }
}

}  // namespace

void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads) {
  if (M <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      return quantize_act_impl<DType::kFloat32>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R,
                                                num_threads);
    case DType::kBFloat16:
      return quantize_act_impl<DType::kBFloat16>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R,
                                                 num_threads);
    case DType::kFloat16:
      return quantize_act_impl<DType::kFloat16>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R,
                                                num_threads);
  }
}

// Rows are contiguous and K is even, so a byte never straddles two rows: both directions run
// over the flat array of n = rows * K / 2 bytes, in chunks whose boundaries are multiples of 32.
namespace {
constexpr int64_t kPackChunk = int64_t{1} << 15;  // output bytes per OpenMP work item

inline int pack_threads(int64_t n, int num_threads) {
  return static_cast<int>(min_i64(num_threads, ceil_div(n, kPackChunk)));
}
}  // namespace

void pack_int4(const int8_t* src, uint8_t* dst, int64_t rows, int64_t K, int num_threads) {
  const int64_t n = rows * (K / 2);
  if (n <= 0) return;
  const int nt = pack_threads(n, num_threads);
  const __m256i lo = _mm256_set1_epi16(0x000f);
  const __m256i hi = _mm256_set1_epi16(0x00f0);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c0 = 0; c0 < n; c0 += kPackChunk) {
    const int64_t c1 = min_i64(n, c0 + kPackChunk);
    int64_t i = c0;
    for (; i + 32 <= c1; i += 32) {
      const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i));
      const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * i + 32));
      // Same fold as pack_group: 16-bit lane (even | odd << 8) -> (even & 15) | (odd & 15) << 4.
      const __m256i r0 =
          _mm256_or_si256(_mm256_and_si256(b0, lo), _mm256_and_si256(_mm256_srli_epi16(b0, 4), hi));
      const __m256i r1 =
          _mm256_or_si256(_mm256_and_si256(b1, lo), _mm256_and_si256(_mm256_srli_epi16(b1, 4), hi));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i),
                          _mm256_permute4x64_epi64(_mm256_packus_epi16(r0, r1), 0xD8));
    }
    for (; i < c1; ++i)
      dst[i] = static_cast<uint8_t>((static_cast<uint8_t>(src[2 * i]) & 0x0f) |
                                    ((static_cast<uint8_t>(src[2 * i + 1]) & 0x0f) << 4));
  }
}

void unpack_int4(const uint8_t* src, int8_t* dst, int64_t rows, int64_t K, int num_threads) {
  const int64_t n = rows * (K / 2);
  if (n <= 0) return;
  const int nt = pack_threads(n, num_threads);
  const __m256i nib = _mm256_set1_epi8(0x0f);
  const __m256i eight = _mm256_set1_epi8(0x08);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t c0 = 0; c0 < n; c0 += kPackChunk) {
    const int64_t c1 = min_i64(n, c0 + kPackChunk);
    int64_t i = c0;
    for (; i + 32 <= c1; i += 32) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + i));
      const __m256i l = _mm256_and_si256(v, nib);
      const __m256i h = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
      // unpack{lo,hi}_epi8 interleave per 128-bit lane: a = bytes [0..7 | 16..23], b = [8..15 | 24..31].
      const __m256i a = _mm256_unpacklo_epi8(l, h);
      const __m256i b = _mm256_unpackhi_epi8(l, h);
      __m256i o0 = _mm256_permute2x128_si256(a, b, 0x20);
      __m256i o1 = _mm256_permute2x128_si256(a, b, 0x31);
      // (v ^ 8) - 8 sign-extends a 4-bit two's-complement value.
      o0 = _mm256_sub_epi8(_mm256_xor_si256(o0, eight), eight);
      o1 = _mm256_sub_epi8(_mm256_xor_si256(o1, eight), eight);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i), o0);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + 2 * i + 32), o1);
    }
    for (; i < c1; ++i) {
      dst[2 * i] = static_cast<int8_t>(((src[i] & 0x0f) ^ 0x08) - 0x08);
      dst[2 * i + 1] = static_cast<int8_t>(((src[i] >> 4) ^ 0x08) - 0x08);
    }
  }
}

}  // namespace svdq::cpu::avx2
