// AVX2 W4A4 GEMM (vpmaddubsw + vpmaddwd) on the packed layout of gemm_layout.h.
//
// Micro-kernel: kRowsPerBlock (4) activation rows x one 16-column tile. Per 64-group, 16 steps each
// load 32 bytes of weight nibbles (split by a mask and a shift into two vectors of 8 columns x 4 k,
// unsigned q_w + 8) and broadcast 4 signed activation codes per row; vpmaddubsw (u8 x s8 -> pairs
// summed into s16) accumulates in 16-bit registers for the whole group (|pair| <= 15·8·2 = 240,
// 16 steps -> <= 3840: no saturation), so the 32-bit widening (vpmaddwd with ones), the −8·Σq_x
// correction and the float scaling run once per group, not per step.
// Registers: 8 s16 accumulators + 2 weight vectors + mask + broadcast + product; the float
// accumulators live in a small stack array (touched once per group). The step is inline asm (see
// tile_groups): GCC's schedule of the intrinsics spilled the accumulators, at ~60% of this speed.
// Six rows per block (12 accumulators, mask from memory) measured the same as four on Zen 3.
//
// Cache blocking: rows in chunks of ~192 KiB of int8 codes (rows_per_chunk, stays in L2) x one
// tile (K·8 bytes of weights, 24 KiB at K = 3072). OpenMP over (chunk, tile), chunk-major,
// so a thread sweeps the tiles with one activation chunk hot instead of streaming all of x per tile.
//
// The weights arrive canonical (qweight [N, K/2]); pack_tile builds a tile's layout with byte
// shuffles and two 8x8 dword transposes per group. With one row chunk each tile is packed once,
// into the thread's own buffer, right before use; with several, every tile is packed once per
// call into a scratch buffer the chunks share (N·K/2 bytes, freed on return).
#include <immintrin.h>

#include <chrono>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx2 {
namespace {

// Activation rows kept hot per chunk: about 192 KiB of int8 codes (64 rows at K = 3072, 16 at
// K = 12288), well inside Zen 3's / Skylake's 512 KiB / 1 MiB L2 next to the weight tile.
constexpr int64_t kChunkBytes = 192 * 1024;
int64_t rows_per_chunk(int64_t K) {
  const int64_t rows = (kChunkBytes / (K > 0 ? K : 1)) / kRowsPerBlock * kRowsPerBlock;
  return rows < kRowsPerBlock ? kRowsPerBlock : (rows > 64 ? 64 : rows);
}

// q_x [M, K/2] packed two's-complement nibbles -> xs [M, K] int8 codes, and 8·Σ of each row's groups.
void unpack_signed(const uint8_t* q_x, int8_t* xs, int32_t* sumx8, int64_t M, int64_t K, int num_threads) {
  const int64_t KH = K / 2, G = K / kGroupSize;
  const __m256i lo_mask = _mm256_set1_epi8(0x0f), eight = _mm256_set1_epi8(0x08);
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t m = 0; m < M; ++m) {
    const uint8_t* src = q_x + m * KH;
    int8_t* dst = xs + m * K;
    // A group is 32 packed bytes: one vector.
    for (int64_t g = 0; g < G; ++g) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + g * 32));
      // n ^ 8 = q + 8 in [0, 15] (unsigned, for the sum); minus 8 gives the signed code.
      const __m256i lo = _mm256_xor_si256(_mm256_and_si256(b, lo_mask), eight);
      const __m256i hi = _mm256_xor_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), lo_mask), eight);
      const __m256i sad = _mm256_add_epi64(_mm256_sad_epu8(lo, _mm256_setzero_si256()),
                                           _mm256_sad_epu8(hi, _mm256_setzero_si256()));
      const __m128i s2 = _mm_add_epi64(_mm256_castsi256_si128(sad), _mm256_extracti128_si256(sad, 1));
      const int64_t sum_u = _mm_cvtsi128_si64(s2) + _mm_extract_epi64(s2, 1);
      sumx8[m * G + g] = static_cast<int32_t>(8 * (sum_u - 8 * kGroupSize));
      // Interleave: element 2j is the low nibble of byte j.
      const __m256i a0 = _mm256_sub_epi8(_mm256_unpacklo_epi8(lo, hi), eight);
      const __m256i a1 = _mm256_sub_epi8(_mm256_unpackhi_epi8(lo, hi), eight);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 64), _mm256_permute2x128_si256(a0, a1, 0x20));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + g * 64 + 32), _mm256_permute2x128_si256(a0, a1, 0x31));
    }
  }
}

// 8x8 transpose of 32-bit elements: r[i][j] -> r[j][i].
inline void transpose8x8_epi32(__m256i r[8]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i + 0] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    r[j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x20);
    r[4 + j] = _mm256_permute2x128_si256(u[j], u[4 + j], 0x31);
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// acc[r][0..15] += sum over groups for rows r < MR of the block starting at xu (row stride K).
template <int MR>
void tile_groups(const int8_t* xs, const float* sx, const int32_t* sumx8, const GemmArgs& a, const Tile& tile,
                 float acc[kRowsPerBlock][kTileN]) {
  const int64_t G = a.K / kGroupSize;
  const __m256i ones = _mm256_set1_epi16(1), lo_mask = _mm256_set1_epi8(0x0f);
  for (int64_t g = 0; g < G; ++g) {
    __m256i s16[MR][2];
    for (int r = 0; r < MR; ++r) s16[r][0] = s16[r][1] = _mm256_setzero_si256();
    const uint8_t* w = tile.wp + g * kTileBytes;
    const int8_t* x = xs + g * kGroupSize;
    // The 16 steps in asm, one block for the weight unpack and one per row: with intrinsics GCC
    // unrolls the loop, computes products of later steps early and spills them to the stack (the
    // 8 accumulators, 2 weight vectors and the mask must all stay in the 16 ymm registers).
    for (int k4 = 0; k4 < 16; ++k4) {
      __m256i w0, w1;
      asm("vmovdqu %[w], %[w1]\n\t"
          "vpand %[w1], %[m], %[w0]\n\t"
          "vpsrlw $4, %[w1], %[w1]\n\t"
          "vpand %[w1], %[m], %[w1]"
          : [w0] "=&x"(w0), [w1] "=&x"(w1)
          : [w] "m"(*reinterpret_cast<const __m256i*>(w + k4 * 32)), [m] "x"(lo_mask));
      for (int r = 0; r < MR; ++r) {
        // vpmaddubsw src2, src1, dst (AT&T): dst = pairs of unsigned src1 x signed src2, summed in s16.
        asm("vpbroadcastd %[x], %%ymm15\n\t"
            "vpmaddubsw %%ymm15, %[w0], %%ymm14\n\t"
            "vpaddw %%ymm14, %[a], %[a]\n\t"
            "vpmaddubsw %%ymm15, %[w1], %%ymm14\n\t"
            "vpaddw %%ymm14, %[b], %[b]"
            : [a] "+x"(s16[r][0]), [b] "+x"(s16[r][1])
            : [x] "m"(*reinterpret_cast<const int32_t*>(x + r * a.K + 4 * k4)), [w0] "x"(w0), [w1] "x"(w1)
            : "xmm14", "xmm15");
      }
    }
    const float* sw = tile.sw + g * kTileN;
    const __m256 sw0 = _mm256_loadu_ps(sw), sw1 = _mm256_loadu_ps(sw + 8);
    for (int r = 0; r < MR; ++r) {
      const __m256 sxb = _mm256_set1_ps(sx[r * G + g]);
      const __m256i c = _mm256_set1_epi32(sumx8[r * G + g]);
      const __m256i d0 = _mm256_sub_epi32(_mm256_madd_epi16(s16[r][0], ones), c);
      const __m256i d1 = _mm256_sub_epi32(_mm256_madd_epi16(s16[r][1], ones), c);
      _mm256_storeu_ps(acc[r], _mm256_fmadd_ps(_mm256_cvtepi32_ps(d0), _mm256_mul_ps(sxb, sw0),
                                               _mm256_loadu_ps(acc[r])));
      _mm256_storeu_ps(acc[r] + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(d1), _mm256_mul_ps(sxb, sw1),
                                                   _mm256_loadu_ps(acc[r] + 8)));
    }
  }
}

// Low-rank + bias epilogue and the store of rows [m0, m0 + rows) of tile t.
void epilogue(const GemmArgs& a, int64_t t, const Tile& tile, int64_t m0, int rows,
              float acc[kRowsPerBlock][kTileN]) {
  const int64_t n0 = t * kTileN, cols = min_i64(kTileN, a.N - n0);
  const __m256 b0 = _mm256_loadu_ps(tile.bias), b1 = _mm256_loadu_ps(tile.bias + 8);
  for (int r = 0; r < rows; ++r) {
    __m256 v0 = _mm256_add_ps(_mm256_loadu_ps(acc[r]), b0), v1 = _mm256_add_ps(_mm256_loadu_ps(acc[r] + 8), b1);
    const float* la = a.lora_act + (m0 + r) * a.R;
    const float* lu = tile.lu;
    for (int64_t k = 0; k < a.R; ++k) {
      const __m256 l = _mm256_set1_ps(la[k]);
      v0 = _mm256_fmadd_ps(l, _mm256_loadu_ps(lu + k * kTileN), v0);
      v1 = _mm256_fmadd_ps(l, _mm256_loadu_ps(lu + k * kTileN + 8), v1);
    }
    float* out = a.y + (m0 + r) * a.N + n0;
    if (cols == kTileN) {
      _mm256_storeu_ps(out, v0);
      _mm256_storeu_ps(out + 8, v1);
    } else {
      alignas(32) float tmp[kTileN];
      _mm256_store_ps(tmp, v0);
      _mm256_store_ps(tmp + 8, v1);
      std::memcpy(out, tmp, cols * sizeof(float));
    }
  }
}

}  // namespace

// dst[j * 16 + c] = src[(n0 + c) * cols + j] as float32 for the tile's 16 columns (0 past N). The
// dtype switch sits outside the loops: per element it is a load, a widening and a store.
static void columns_to_lanes(const void* src, DType dt, int64_t n0, int64_t N, int64_t cols, float* dst) {
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = n0 + c;
    if (n >= N) {
      for (int64_t j = 0; j < cols; ++j) dst[j * kTileN + c] = 0.0f;
      continue;
    }
    switch (dt) {
      case DType::kBFloat16: {
        const uint16_t* row = static_cast<const uint16_t*>(src) + n * cols;
        for (int64_t j = 0; j < cols; ++j) dst[j * kTileN + c] = bf16_to_f32(row[j]);
        break;
      }
      case DType::kFloat16: {
        const uint16_t* row = static_cast<const uint16_t*>(src) + n * cols;
        for (int64_t j = 0; j < cols; ++j) dst[j * kTileN + c] = _cvtsh_ss(row[j]);
        break;
      }
      case DType::kFloat32:
      default: {
        const float* row = static_cast<const float*>(src) + n * cols;
        for (int64_t j = 0; j < cols; ++j) dst[j * kTileN + c] = row[j];
        break;
      }
    }
  }
}

// Tile t of gemm_layout.h from the canonical tensors. Per group: column c's 32 bytes and column
// 8 + c's are merged into one byte per k (low nibble c, high nibble 8 + c, both + 8 via ^ 0x88),
// which leaves, per column pair, dwords (4 consecutive k) in the order k4 = 0-3, 8-11 (lo) and
// 4-7, 12-15 (hi); transposing the 8 column pairs x 8 dwords turns them into rows of k4.
void pack_tile(const GemmArgs& a, int64_t t, const Tile& out) {
  const int64_t G = a.K / kGroupSize, KH = a.K / 2, n0 = t * kTileN;
  const DType dt = static_cast<DType>(a.wdtype);
  alignas(32) static const uint8_t zeros[32] = {};
  const __m256i m0f = _mm256_set1_epi8(0x0f), mf0 = _mm256_set1_epi8(static_cast<char>(0xf0));
  const __m256i plus8 = _mm256_set1_epi8(static_cast<char>(0x88));
  for (int64_t g = 0; g < G; ++g) {
    __m256i lo[8], hi[8];
    for (int c = 0; c < 8; ++c) {
      const int64_t na = n0 + c, nb = n0 + 8 + c;
      const uint8_t* pa = na < a.N ? a.qweight + na * KH + g * 32 : zeros;
      const uint8_t* pb = nb < a.N ? a.qweight + nb * KH + g * 32 : zeros;
      const __m256i A = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pa)), plus8);
      const __m256i B = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pb)), plus8);
      const __m256i even = _mm256_or_si256(_mm256_and_si256(A, m0f), _mm256_slli_epi16(_mm256_and_si256(B, m0f), 4));
      const __m256i odd = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(A, 4), m0f), _mm256_and_si256(B, mf0));
      lo[c] = _mm256_unpacklo_epi8(even, odd);
      hi[c] = _mm256_unpackhi_epi8(even, odd);
    }
    transpose8x8_epi32(lo);
    transpose8x8_epi32(hi);
    __m256i* w = reinterpret_cast<__m256i*>(out.wp + g * kTileBytes);
    for (int u = 0; u < 4; ++u) {
      _mm256_storeu_si256(w + u, lo[u]);
      _mm256_storeu_si256(w + 8 + u, lo[4 + u]);
      _mm256_storeu_si256(w + 4 + u, hi[u]);
      _mm256_storeu_si256(w + 12 + u, hi[4 + u]);
    }
  }
  columns_to_lanes(a.wscales, dt, n0, a.N, G, out.sw);
  columns_to_lanes(a.lora_up, dt, n0, a.N, a.R, out.lu);
  if (a.bias != nullptr) {
    columns_to_lanes(a.bias, dt, n0, a.N, 1, out.bias);
  } else {
    for (int c = 0; c < kTileN; ++c) out.bias[c] = 0.0f;
  }
}

void gemm_w4a4(const GemmArgs& a) {
  const int64_t G = a.K / kGroupSize, T = ceil_div(a.N, kTileN);
  const int64_t chunk = rows_per_chunk(a.K), C = ceil_div(a.M, chunk);
  const int64_t floats = (G + a.R + 1) * kTileN;
  std::vector<int8_t> xs(static_cast<size_t>(a.M * a.K));
  std::vector<int32_t> sumx8(static_cast<size_t>(a.M * G));
  unpack_signed(a.q_x, xs.data(), sumx8.data(), a.M, a.K, a.num_threads);
  // Several chunks reuse every tile: pack the whole layer once. One chunk: pack per tile, in place.
  const bool shared = C > 1;
  std::vector<uint8_t> wp_all(shared ? static_cast<size_t>(T * G * kTileBytes) : 0);
  std::vector<float> fl_all(shared ? static_cast<size_t>(T * floats) : 0);
  auto tile_at = [&](uint8_t* wp, float* fl) { return Tile{wp, fl, fl + G * kTileN, fl + (G + a.R) * kTileN}; };
  if (shared) {
#pragma omp parallel for schedule(static) num_threads(a.num_threads)
    for (int64_t t = 0; t < T; ++t) pack_tile(a, t, tile_at(wp_all.data() + t * G * kTileBytes, fl_all.data() + t * floats));
  }
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<uint8_t> wp_own(shared ? 0 : static_cast<size_t>(G * kTileBytes));
    std::vector<float> fl_own(shared ? 0 : static_cast<size_t>(floats));
#pragma omp for collapse(2) schedule(static)
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < T; ++t) {
        Tile tile;
        if (shared) {
          tile = tile_at(wp_all.data() + t * G * kTileBytes, fl_all.data() + t * floats);
        } else {
          tile = tile_at(wp_own.data(), fl_own.data());
          pack_tile(a, t, tile);
        }
        const int64_t chunk_end = min_i64(a.M, (c + 1) * chunk);
        for (int64_t m0 = c * chunk; m0 < chunk_end; m0 += kRowsPerBlock) {
          const int rows = static_cast<int>(min_i64(kRowsPerBlock, chunk_end - m0));
          alignas(32) float acc[kRowsPerBlock][kTileN] = {};
          const int8_t* x = xs.data() + m0 * a.K;
          const float* sx = a.s_x + m0 * G;
          const int32_t* s8 = sumx8.data() + m0 * G;
          switch (rows) {
            case 4: tile_groups<4>(x, sx, s8, a, tile, acc); break;
            case 3: tile_groups<3>(x, sx, s8, a, tile, acc); break;
            case 2: tile_groups<2>(x, sx, s8, a, tile, acc); break;
            default: tile_groups<1>(x, sx, s8, a, tile, acc); break;
          }
          epilogue(a, t, tile, m0, rows, acc);
        }
      }
    }
  }
}

double int8_peak_gops(int num_threads, int64_t iters) {
  // The GEMM's inner step with nothing else: vpmaddubsw summed into s16 for 16 steps, then one
  // vpmaddwd widening to s32 (the kernel's per-group pattern), on operands already in registers.
  // 8 independent chains hide the latency; the asm body cannot be hoisted out of the loop.
  const auto start = std::chrono::steady_clock::now();
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
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // 32 u8 x s8 products and their 32 additions per vpmaddubsw: 64 ops, as a GEMM counts 2·M·N·K.
  // (sink only keeps the accumulators alive; it is 0 times anything.)
  const double ops = 64.0 * 8.0 * 16.0 * static_cast<double>(outer) * num_threads + 0.0 * sink;
  return ops / secs / 1e9;
}

}  // namespace svdq::cpu::avx2
