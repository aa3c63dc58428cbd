// Portable scalar W4A4 GEMM: the fallback on any CPU and the second reference the vector paths are
// tested against. It builds each tile of gemm_layout.h from the canonical weights (pack_tile, also
// what the vector paths' packing is checked against), then runs the same integer math as the AVX2
// path (unsigned weights q_w + 8, minus 8·Σq_x per row and group) with the same float order per
// group (fma of the int dot into the accumulator with s_x·s_w).
#include <cmath>
#include <vector>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::generic {

void pack_tile(const GemmArgs& a, int64_t t, const Tile& out) {
  const int64_t G = a.K / kGroupSize, KH = a.K / 2;
  const DType dt = static_cast<DType>(a.wdtype);
  for (int c = 0; c < kTileN; ++c) {
    const int64_t n = t * kTileN + c;
    const bool real = n < a.N;
    const uint8_t* row = a.qweight + n * KH;
    for (int64_t k = 0; k < a.K; ++k) {
      // Nibble ^ 8 = code + 8 (two's complement); padding columns hold code 0.
      const uint8_t u =
          real ? static_cast<uint8_t>((((k & 1) ? (row[k / 2] >> 4) : row[k / 2]) & 0xf) ^ 8) : 8;
      const int64_t g = k / kGroupSize, kk = k % kGroupSize;
      uint8_t& b = out.wp[g * kTileBytes + (kk / 4) * 32 + (c % 8) * 4 + kk % 4];
      b = c < 8 ? static_cast<uint8_t>((b & 0xf0) | u) : static_cast<uint8_t>((b & 0x0f) | (u << 4));
    }
    for (int64_t g = 0; g < G; ++g) out.sw[g * kTileN + c] = real ? load_f32(a.wscales, n * G + g, dt) : 0.0f;
    for (int64_t r = 0; r < a.R; ++r)
      out.lu[r * kTileN + c] = real ? load_f32(a.lora_up, n * a.R + r, dt) : 0.0f;
    out.bias[c] = real && a.bias ? load_f32(a.bias, n, dt) : 0.0f;
  }
}

void gemm_w4a4(const GemmArgs& a) {
  const int64_t G = a.K / kGroupSize, T = ceil_div(a.N, kTileN), KH = a.K / 2;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<uint8_t> wp(static_cast<size_t>(G * kTileBytes));
    std::vector<float> fl(static_cast<size_t>((G + a.R + 1) * kTileN));
    const Tile tile{wp.data(), fl.data(), fl.data() + G * kTileN, fl.data() + (G + a.R) * kTileN};
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      pack_tile(a, t, tile);
      for (int64_t m = 0; m < a.M; ++m) {
        float acc[kTileN] = {};
        const uint8_t* xrow = a.q_x + m * KH;
        for (int64_t g = 0; g < G; ++g) {
          int32_t dot[kTileN] = {};
          int32_t sumx = 0;
          const uint8_t* w = tile.wp + g * kTileBytes;
          for (int k4 = 0; k4 < 16; ++k4) {
            for (int j = 0; j < 4; ++j) {
              const int64_t k = g * kGroupSize + 4 * k4 + j;
              const uint8_t byte = xrow[k / 2];
              // Nibble n holds q = n - 16·(n >= 8) = (n ^ 8) - 8.
              const int32_t qx = (((k & 1) ? (byte >> 4) : (byte & 0xf)) ^ 8) - 8;
              sumx += qx;
              for (int c = 0; c < 8; ++c) {
                const uint8_t wb = w[k4 * 32 + c * 4 + j];
                dot[c] += (wb & 0xf) * qx;
                dot[8 + c] += (wb >> 4) * qx;
              }
            }
          }
          const float sx = a.s_x[m * G + g];
          const float* sw = tile.sw + g * kTileN;
          for (int col = 0; col < kTileN; ++col)
            acc[col] = std::fma(static_cast<float>(dot[col] - 8 * sumx), sx * sw[col], acc[col]);
        }
        const int64_t n0 = t * kTileN, cols = min_i64(kTileN, a.N - n0);
        for (int col = 0; col < cols; ++col) {
          float v = acc[col] + tile.bias[col];
          for (int64_t r = 0; r < a.R; ++r)
            v = std::fma(a.lora_act[m * a.R + r], tile.lu[r * kTileN + col], v);
          a.y[m * a.N + n0 + col] = v;
        }
      }
    }
  }
}

}  // namespace svdq::cpu::generic
