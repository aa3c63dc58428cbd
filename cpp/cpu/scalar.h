// Scalar element conversions shared by every CPU path.
//
// Everything here has internal linkage (anonymous namespace): each kernel translation unit gets
// its own copy compiled with its own flags, so an AVX2-compiled copy can never be the one the
// linker keeps for the generic path.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernels.h"

namespace svdq::cpu {
namespace {

inline float bits_to_f32(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// bfloat16 is the top half of a float32: widening is exact.
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// Exact IEEE binary16 -> binary32, subnormals, infinities and NaN payloads included, without
// F16C so the generic path runs on any x86-64 (and non-x86) CPU.
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + (127 - 15)) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {
    // A binary16 subnormal is a normal binary32: shift the mantissa up to its implicit bit.
    exp = 127 - 15 + 1;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3ffu) << 13);
  }
  return bits_to_f32(bits);
}

// Element i of a `dtype` array as float32.
inline float load_f32(const void* p, int64_t i, DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat16:
      return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    case DType::kFloat32:
    default:
      return static_cast<const float*>(p)[i];
  }
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t min_i64(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

}  // namespace
}  // namespace svdq::cpu
