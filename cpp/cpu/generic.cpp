// Portable scalar kernels: the fallback on every CPU and the second reference for the ISA paths.
//
// Layout (see kernels.h): x [M, K] row-major in `dtype`, smooth [K], lora_down [K, R] row-major;
// q_x uint8 [M, K/2] (element 2j low nibble, 2j+1 high nibble), s_x float32 [M, K/64],
// lora_act float32 [M, R].
//
// Numerics are those of reference.quantize_act, bit for bit for q_x and s_x:
//   xh = float(x) / float(smooth)          IEEE division, not a reciprocal multiply
//   s  = absmax(xh over 64-group) / 7.0f   IEEE division
//   q  = clamp(round_half_even(xh / s), -8, 7), and q = 0 where s == 0
// lora_act = xh @ float(lora_down), accumulated in float32 (order free; checked with a tolerance).
//
// Compiled with no ISA flags and -ffp-contract=off, so nothing here depends on the build host.

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::generic {
namespace {

template <DType D>
inline float elem(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::kBFloat16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

inline int8_t quantize_one(float v, float s) {
  float q = std::nearbyint(v / s);  // the default rounding mode is round-half-to-even
  if (q != q) return 0;             // NaN input: defined result instead of a UB cast
  q = q < -8.0f ? -8.0f : (q > 7.0f ? 7.0f : q);
  return static_cast<int8_t>(q);
}

// One row. x_row: [K] `D`; sm: float32 [K]; lora_down: [K, R] `D`; xh: float32 [K] scratch;
// q_row: uint8 [K/2]; s_row: float32 [K/64]; act_row: float32 [R].
template <DType D>
void quantize_row(const void* x_row, const float* sm, const void* lora_down, float* xh, uint8_t* q_row,
                  float* s_row, float* act_row, int64_t K, int64_t R) {
  for (int64_t k = 0; k < K; ++k) xh[k] = elem<D>(x_row, k) / sm[k];

  for (int64_t g = 0; g < K / kGroupSize; ++g) {
    const float* v = xh + g * kGroupSize;
    float amax = 0.0f;
    for (int64_t i = 0; i < kGroupSize; ++i) {
      const float a = std::fabs(v[i]);
      amax = a > amax ? a : amax;
    }
    const float s = amax / 7.0f;
    s_row[g] = s;
    uint8_t* q = q_row + g * (kGroupSize / 2);
    if (s == 0.0f) {  // all-zero group (or absmax/7 underflowed): codes 0, scale 0, no NaN
      std::memset(q, 0, kGroupSize / 2);
      continue;
    }
    for (int64_t i = 0; i < kGroupSize; i += 2) {
      const uint8_t lo = static_cast<uint8_t>(quantize_one(v[i], s)) & 0x0f;
      const uint8_t hi = static_cast<uint8_t>(quantize_one(v[i + 1], s)) & 0x0f;
      q[i / 2] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }

  for (int64_t r = 0; r < R; ++r) act_row[r] = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const float xv = xh[k];
    for (int64_t r = 0; r < R; ++r) act_row[r] += xv * elem<D>(lora_down, k * R + r);
  }
}

template <DType D>
void quantize_act_impl(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                       float* lora_act, int64_t M, int64_t K, int64_t R, int num_threads) {
  const int nt = static_cast<int>(min_i64(num_threads, M));
  std::vector<float> sm(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) sm[k] = elem<D>(smooth, k);
  // One scratch row per thread, allocated here so a bad_alloc never escapes a parallel region.
  std::vector<float> scratch(static_cast<size_t>(nt) * static_cast<size_t>(K));
  const size_t elem_size = dtype_size(D);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int tid = thread_index();
    quantize_row<D>(static_cast<const char*>(x) + static_cast<size_t>(m * K) * elem_size, sm.data(),
                    lora_down, scratch.data() + static_cast<size_t>(tid) * K, q_x + m * (K / 2),
                    s_x + m * (K / kGroupSize), lora_act + m * R, K, R);
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

}  // namespace svdq::cpu::generic
