// Portable scalar W4A4 GEMM: the fallback on any CPU and the second reference the vector paths are
// tested against. It builds each tile of gemm_layout.h from the canonical weights (pack_tile), then
// runs the same integer math as the x86 paths (unsigned activations q_x + 8, sums started at the
// tile's −8·Σq_w) with the same float order per group (fma of the int dot into the accumulator
// with s_x·s_w).
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
    for (int64_t g = 0; g < G; ++g) {
      int32_t sum = 0;
      for (int64_t kk = 0; kk < kGroupSize; ++kk) {
        const int64_t k = g * kGroupSize + kk;
        // Nibble n holds q = (n ^ 8) - 8; padding columns hold code 0.
        const int32_t q = real ? ((((k & 1) ? (row[k / 2] >> 4) : row[k / 2]) & 0xf) ^ 8) - 8 : 0;
        out.wq[g * kTileBytes + (kk / 4) * 64 + (c / 8) * 32 + (c % 8) * 4 + kk % 4] = static_cast<int8_t>(q);
        sum += q;
      }
      out.wsum[g * kTileN + c] = static_cast<int16_t>(-8 * sum);
      out.sw[g * kTileN + c] = real ? load_f32(a.wscales, n * G + g, dt) : 0.0f;
    }
    for (int64_t r = 0; r < a.R; ++r)
      out.lu[r * kTileN + c] = real ? load_f32(a.lora_up, n * a.R + r, dt) : 0.0f;
    out.bias[c] = real && a.bias ? load_f32(a.bias, n, dt) : 0.0f;
  }
}

void gemm_w4a4(const GemmArgs& a) {
  const int64_t G = a.K / kGroupSize, T = ceil_div(a.N, kTileN), KH = a.K / 2;
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<uint8_t> bytes(static_cast<size_t>(G * (kTileBytes + kTileSumBytes)));
    std::vector<float> floats(static_cast<size_t>((G + a.R + 1) * kTileN));
    const Tile tile = tile_at(bytes.data(), floats.data(), G, a.R);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      pack_tile(a, t, tile);
      for (int64_t m = 0; m < a.M; ++m) {
        float acc[kTileN] = {};
        const uint8_t* xrow = a.q_x + m * KH;
        for (int64_t g = 0; g < G; ++g) {
          int32_t dot[kTileN];
          for (int col = 0; col < kTileN; ++col) dot[col] = tile.wsum[g * kTileN + col];
          const int8_t* w = tile.wq + g * kTileBytes;
          for (int k4 = 0; k4 < 16; ++k4) {
            for (int j = 0; j < 4; ++j) {
              const int64_t k = g * kGroupSize + 4 * k4 + j;
              const uint8_t byte = xrow[k / 2];
              // The unsigned activation code q_x + 8 = nibble ^ 8.
              const int32_t ux = ((k & 1) ? (byte >> 4) : (byte & 0xf)) ^ 8;
              for (int col = 0; col < kTileN; ++col)
                dot[col] += ux * w[k4 * 64 + (col / 8) * 32 + (col % 8) * 4 + j];
            }
          }
          const float sx = a.s_x[m * G + g];
          const float* sw = tile.sw + g * kTileN;
          for (int col = 0; col < kTileN; ++col)
            acc[col] = std::fma(static_cast<float>(dot[col]), sx * sw[col], acc[col]);
        }
        const int64_t n0 = t * kTileN, cols = min_i64(kTileN, a.N - n0);
        for (int col = 0; col < cols; ++col) {
          float v = acc[col] + tile.bias[col];
          for (int64_t r = 0; r < a.R; ++r)
            v = std::fma(a.lora_act[m * a.R + r], tile.lu[r * kTileN + col], v);
          const int64_t i = m * a.N + n0 + col;
          switch (static_cast<DType>(a.ydtype)) {
            case DType::kBFloat16:
              static_cast<uint16_t*>(a.y)[i] = f32_to_bf16(v);
              break;
            case DType::kFloat16:
              static_cast<uint16_t*>(a.y)[i] = f32_to_f16(v);
              break;
            case DType::kFloat32:
            default:
              static_cast<float*>(a.y)[i] = v;
              break;
          }
        }
      }
    }
  }
}

}  // namespace svdq::cpu::generic
