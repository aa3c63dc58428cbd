// Portable scalar W4A4 GEMM on the packed layout of gemm_layout.h: the fallback on any CPU and the
// second reference the vector paths are tested against. Same integer math as the AVX2 path
// (unsigned weights q_w + 8, minus 8·Σq_x per row and group) and the same float order per group
// (fma of the int dot into the accumulator with s_x·s_w).
#include <cmath>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::generic {

void gemm_w4a4(const GemmArgs& a) {
  const int64_t G = a.K / kGroupSize, T = ceil_div(a.N, kTileN), KH = a.K / 2;
#pragma omp parallel for collapse(2) schedule(static) num_threads(a.num_threads)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t m = 0; m < a.M; ++m) {
      float acc[kTileN] = {};
      const uint8_t* xrow = a.q_x + m * KH;
      for (int64_t g = 0; g < G; ++g) {
        int32_t dot[kTileN] = {};
        int32_t sumx = 0;
        const uint8_t* w = a.wp + (t * G + g) * kTileBytes;
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
        const float* sw = a.sw + (t * G + g) * kTileN;
        for (int col = 0; col < kTileN; ++col)
          acc[col] = std::fma(static_cast<float>(dot[col] - 8 * sumx), sx * sw[col], acc[col]);
      }
      const int64_t n0 = t * kTileN, cols = min_i64(kTileN, a.N - n0);
      for (int col = 0; col < cols; ++col) {
        float v = acc[col] + (a.bias ? a.bias[n0 + col] : 0.0f);
        for (int64_t r = 0; r < a.R; ++r)
          v = std::fma(a.lora_act[m * a.R + r], a.lora_up[(t * a.R + r) * kTileN + col], v);
        a.y[m * a.N + n0 + col] = v;
      }
    }
  }
}

}  // namespace svdq::cpu::generic
