// quantize_act on AArch64 Advanced SIMD (base Armv8-A: every 64-bit Arm CPU has it, so this file needs no
// flags; the dotprod and i8mm paths share it). Bit for bit the generic path's results, lora_act included:
//   xh  = float(x) / float(smooth)        fdiv per lane, IEEE like the scalar division
//   s   = absmax(xh over the group) / 7   fmaxnm ignores NaN lanes as generic's `a > amax ? a : amax` does
//   q   = fcvtns(xh / s) clamped           round half to even; fcvtns turns NaN into 0, generic's rule
//   lora_act[r] = Σ_k xh[k] · lora_down[k, r]   vectorised over r, k in order, multiply then add (no fma),
//                                             so every r sees generic's exact sequence of roundings.
#include <arm_neon.h>

#include <cstring>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::neon {
namespace {

// Four `D` elements from p[i] as float32 (exact widening).
template <DType D>
inline float32x4_t load4(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return vld1q_f32(static_cast<const float*>(p) + i);
  } else if constexpr (D == DType::kBFloat16) {
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(static_cast<const uint16_t*>(p) + i), 16));
  } else {
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(static_cast<const uint16_t*>(p) + i)));
  }
}

template <DType D>
inline float load1(const void* p, int64_t i) {
  if constexpr (D == DType::kFloat32) {
    return static_cast<const float*>(p)[i];
  } else if constexpr (D == DType::kBFloat16) {
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  } else {
    return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}

// 16 codes of one group (4 vectors of xh / s, already rounded and clamped) narrowed to int8.
inline int8x16_t narrow16(int32x4_t a, int32x4_t b, int32x4_t c, int32x4_t d) {
  const int16x8_t ab = vcombine_s16(vmovn_s32(a), vmovn_s32(b)), cd = vcombine_s16(vmovn_s32(c), vmovn_s32(d));
  return vcombine_s8(vmovn_s16(ab), vmovn_s16(cd));
}

// One group of 64 values v (float32, xh) with scale s != 0 -> 32 packed bytes (element 2j low nibble).
inline void quantize_group(const float* v, float s, uint8_t* q) {
  const float32x4_t sv = vdupq_n_f32(s);
  const int32x4_t lo = vdupq_n_s32(-8), hi = vdupq_n_s32(7);
  int8x16_t codes[4];
  for (int b = 0; b < 4; ++b) {
    int32x4_t c[4];
    for (int i = 0; i < 4; ++i)
      c[i] = vminq_s32(vmaxq_s32(vcvtnq_s32_f32(vdivq_f32(vld1q_f32(v + 16 * b + 4 * i), sv)), lo), hi);
    codes[b] = narrow16(c[0], c[1], c[2], c[3]);
  }
  const int8x16_t mask = vdupq_n_s8(0x0f);
  for (int h = 0; h < 2; ++h) {  // 32 codes -> 16 bytes: even k in the low nibble, odd k in the high one
    const int8x16_t even = vuzp1q_s8(codes[2 * h], codes[2 * h + 1]), odd = vuzp2q_s8(codes[2 * h], codes[2 * h + 1]);
    vst1q_u8(q + 16 * h, vreinterpretq_u8_s8(vorrq_s8(vandq_s8(even, mask), vshlq_n_s8(odd, 4))));
  }
}

// act[r0 .. r0 + 4·NV) for one row: NV independent chains over k, each generic's order for its r.
template <DType D, int NV>
inline void lora_block(const float* xh, const void* lora_down, float* act, int64_t K, int64_t R, int64_t r0) {
  float32x4_t a[NV];
  for (int i = 0; i < NV; ++i) a[i] = vdupq_n_f32(0.0f);
  for (int64_t k = 0; k < K; ++k) {
    const float xv = xh[k];
    for (int i = 0; i < NV; ++i) a[i] = vaddq_f32(a[i], vmulq_n_f32(load4<D>(lora_down, k * R + r0 + 4 * i), xv));
  }
  for (int i = 0; i < NV; ++i) vst1q_f32(act + r0 + 4 * i, a[i]);
}

template <DType D>
void lora_row(const float* xh, const void* lora_down, float* act, int64_t K, int64_t R) {
  int64_t r0 = 0;
  for (; r0 + 32 <= R; r0 += 32) lora_block<D, 8>(xh, lora_down, act, K, R, r0);
  for (; r0 + 4 <= R; r0 += 4) lora_block<D, 1>(xh, lora_down, act, K, R, r0);
  for (; r0 < R; ++r0) {  // the last R % 4 columns, scalar in the same order
    float s = 0.0f;
    for (int64_t k = 0; k < K; ++k) s += xh[k] * load1<D>(lora_down, k * R + r0);
    act[r0] = s;
  }
}

// One row: x_row [K] `D`, sm float32 [K], xh float32 [K] scratch; q_row [K/2], s_row [K/64], act_row [R].
template <DType D>
void quantize_row(const void* x_row, const float* sm, const void* lora_down, float* xh, uint8_t* q_row,
                  float* s_row, float* act_row, int64_t K, int64_t R) {
  for (int64_t k = 0; k < K; k += 4) vst1q_f32(xh + k, vdivq_f32(load4<D>(x_row, k), vld1q_f32(sm + k)));
  for (int64_t g = 0; g < K / kGroupSize; ++g) {
    const float* v = xh + g * kGroupSize;
    float32x4_t amax = vdupq_n_f32(0.0f);
    for (int i = 0; i < kGroupSize; i += 4) amax = vmaxnmq_f32(amax, vabsq_f32(vld1q_f32(v + i)));
    const float s = vmaxnmvq_f32(amax) / 7.0f;
    s_row[g] = s;
    uint8_t* q = q_row + g * (kGroupSize / 2);
    if (s == 0.0f) {
      std::memset(q, 0, kGroupSize / 2);
    } else {
      quantize_group(v, s, q);
    }
  }
  lora_row<D>(xh, lora_down, act_row, K, R);
}

template <DType D>
void quantize_act_impl(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                       float* lora_act, int64_t M, int64_t K, int64_t R, int num_threads) {
  const int nt = static_cast<int>(min_i64(num_threads, M));
  Buffer<float> sm(K);
  for (int64_t k = 0; k < K; ++k) sm.p[k] = load1<D>(smooth, k);
  Buffer<float> scratch(static_cast<int64_t>(nt) * K);
  const int64_t elem_size = dtype_size(D);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t m = 0; m < M; ++m) {
    const int tid = thread_index();
    quantize_row<D>(static_cast<const char*>(x) + m * K * elem_size, sm.p, lora_down, scratch.p + tid * K,
                    q_x + m * (K / 2), s_x + m * (K / kGroupSize), lora_act + m * R, K, R);
  }
}

}  // namespace

void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads) {
  if (M <= 0) return;
  switch (dtype) {
    case DType::kFloat32:
      return quantize_act_impl<DType::kFloat32>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R, num_threads);
    case DType::kBFloat16:
      return quantize_act_impl<DType::kBFloat16>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R, num_threads);
    case DType::kFloat16:
      return quantize_act_impl<DType::kFloat16>(x, smooth, lora_down, q_x, s_x, lora_act, M, K, R, num_threads);
  }
}

}  // namespace svdq::cpu::neon
