// Portable scalar W4A16 kernels (reference.linear_w4a16): the fallback on every CPU and the second
// reference for the vector paths (w4a16_x86.inc).
//
// Numerics: x̂ = float(x) / float(smooth) (IEEE division); W = q · s + m with two roundings, as the
// reference forms it (-ffp-contract=off: no fused multiply-add); y = Σ_k x̂ W + lora_act · lora_up + bias
// accumulated in float32 along k, rounded once to the output dtype.
//
// Compiled with no ISA flags, so nothing here depends on the build host.

#include <vector>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::generic {
namespace {

void store_f32(void* p, int64_t i, float v, DType dt) {
  switch (dt) {
    case DType::kBFloat16:
      static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
      break;
    case DType::kFloat16:
      static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
      break;
    case DType::kFloat32:
    default:
      static_cast<float*>(p)[i] = v;
  }
}

// Code k of a row of packed nibbles.
inline int code_at(const uint8_t* row, int64_t k) { return (k & 1) ? row[k / 2] >> 4 : row[k / 2] & 0xf; }

}  // namespace

void linear_w4a16(const W4A16Args& a) {
  const int64_t M = a.M, N = a.N, K = a.K, R = a.R, G = K / kGroupSize;
  const DType dt = static_cast<DType>(a.dtype);
  std::vector<float> xh(static_cast<size_t>(M * K));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) xh[m * K + k] = load_f32(a.x, m * K + k, dt) / load_f32(a.smooth, k, dt);
#pragma omp parallel num_threads(a.num_threads)
  {
    std::vector<float> w(static_cast<size_t>(K));  // one column of W, dequantized once for all rows
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t* row = a.qweight + n * (K / 2);
      for (int64_t g = 0; g < G; ++g) {
        const float s = load_f32(a.wscales, n * G + g, dt), mn = load_f32(a.wmins, n * G + g, dt);
        for (int64_t k = g * kGroupSize; k < (g + 1) * kGroupSize; ++k)
          w[k] = static_cast<float>(code_at(row, k)) * s + mn;
      }
      const float bias = a.bias != nullptr ? load_f32(a.bias, n, dt) : 0.0f;
      for (int64_t m = 0; m < M; ++m) {
        float acc = 0.0f;
        const float* x = xh.data() + m * K;
        for (int64_t k = 0; k < K; ++k) acc += x[k] * w[k];
        for (int64_t r = 0; r < R; ++r) acc += a.lora_act[m * R + r] * load_f32(a.lora_up, n * R + r, dt);
        store_f32(a.y, m * N + n, acc + bias, dt);
      }
    }
  }
}

void dequantize_w4a16(const DequantW4A16Args& a) {
  const int64_t N = a.N, K = a.K, G = K / kGroupSize;
  const DType wdt = static_cast<DType>(a.wdtype), odt = static_cast<DType>(a.odtype);
  std::vector<float> inv(static_cast<size_t>(K), 1.0f);
  if (a.smooth != nullptr)
    for (int64_t k = 0; k < K; ++k) inv[k] = 1.0f / load_f32(a.smooth, k, wdt);
#pragma omp parallel for num_threads(a.num_threads) schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = a.qweight + n * (K / 2);
    for (int64_t g = 0; g < G; ++g) {
      const float s = load_f32(a.wscales, n * G + g, wdt), mn = load_f32(a.wmins, n * G + g, wdt);
      for (int64_t k = g * kGroupSize; k < (g + 1) * kGroupSize; ++k) {
        const float w = static_cast<float>(code_at(row, k)) * s + mn;
        store_f32(a.out, n * a.ldo + k, a.smooth != nullptr ? w * inv[k] : w, odt);
      }
    }
  }
}

}  // namespace svdq::cpu::generic
