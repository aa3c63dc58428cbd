// Scalar element conversions and small helpers (threads, register-block dispatch) shared by every CPU path.
//
// Everything here has internal linkage (anonymous namespace): each kernel translation unit gets
// its own copy compiled with its own flags, so an AVX2-compiled copy can never be the one the
// linker keeps for the generic path.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <type_traits>
#if defined(_MSC_VER)
#include <malloc.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace svdq::cpu {
namespace {

// f(std::integral_constant<int, rows>) for rows in 1..Rows (a register block's row count as a template argument,
// so that its accumulators live in registers).
template <int Rows, typename F>
inline void with_row_count(int64_t rows, F&& f) {
  if constexpr (Rows == 1) {
    f(std::integral_constant<int, 1>{});
  } else if (rows >= Rows) {
    f(std::integral_constant<int, Rows>{});
  } else {
    with_row_count<Rows - 1>(rows, f);
  }
}

// The calling thread's index in the enclosing OpenMP team (0 without OpenMP).
inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

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

inline uint32_t f32_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// float32 -> bfloat16, round to nearest even; NaN -> 0x7FC0 (c10::BFloat16's rule, so outputs match
// torch's .to(torch.bfloat16) bit for bit).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t bits = f32_to_bits(f);
  if (f != f) return 0x7FC0u;
  return static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// Exact IEEE binary32 -> binary16, round to nearest even, subnormals and overflow to infinity
// included, without F16C; NaN -> 0x7E00. The rounding is done by the FPU: the magnitude is scaled
// so that the float32 addition of a power of two whose ulp is binary16's ulp at that exponent leaves
// the rounded binary16 significand in the low bits. Needs IEEE float32 arithmetic (no fast-math,
// which CMakeLists.txt guarantees).
inline uint16_t f32_to_f16(float f) {
  const uint32_t bits = f32_to_bits(f), twice = bits + bits, sign = (bits >> 16) & 0x8000u;
  if (twice > 0xFF000000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  // |f| * 2^112 * 2^-110: overflows to infinity exactly where binary16 does, keeps the rest exact.
  float base = std::fabs(f) * bits_to_f32(0x77800000u);  // 2^112
  base *= bits_to_f32(0x08800000u);                      // 2^-110
  uint32_t bias = twice & 0xFF000000u;                   // f's exponent, shifted left by one
  if (bias < 0x71000000u) bias = 0x71000000u;            // below binary16's normal range: fixed ulp
  base += bits_to_f32((bias >> 1) + 0x07800000u);
  const uint32_t r = f32_to_bits(base);
  return static_cast<uint16_t>(sign | (((r >> 13) & 0x7C00u) + (r & 0x0FFFu)));
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

// [lo, hi): thread t's share of n items among nt, as even as possible.
inline void thread_share(int64_t n, int t, int nt, int64_t& lo, int64_t& hi) {
  lo = n * t / nt;
  hi = n * (t + 1) / nt;
}

// The bf16 GEMVs' prefetch target (w4a16_gemv_bf16.cpp, w4a16_gemv_fixed_ymm.inc). A thread reads its panels of
// panel_cols columns (up to panel n_hi) in the order panel, K block, column, each panel's two halves side by side
// as two code streams; a piece is one column's codes of one K block. For stream t (0: a panel's first half, 1:
// its second) at (panel pn, block b, index c in the half): the piece `ahead` pieces on in that stream's order, as
// its column and block. False past the thread's last panel.
inline bool piece_ahead(int64_t N, int64_t panel_cols, int64_t n_hi, int64_t blocks, int64_t pn, int64_t b,
                        int64_t c, int t, int64_t ahead, int64_t& col, int64_t& block) {
  auto half_cols = [&](int64_t p) {  // columns of panel p in stream t
    const int64_t cols = min_i64(N, (p + 1) * panel_cols) - p * panel_cols, h = ceil_div(cols, 2);
    return t == 0 ? h : cols - h;
  };
  int64_t pp = pn, bb = b, cc = c + ahead;
  while (pp < n_hi && cc >= half_cols(pp)) {
    cc -= half_cols(pp);
    if (++bb == blocks) bb = 0, ++pp;
  }
  col = pp * panel_cols + t * ceil_div(min_i64(N, (pp + 1) * panel_cols) - pp * panel_cols, 2) + cc;
  block = bb;
  return pp < n_hi;
}

// The W4A16 GEMVs' lora_act [M, Rp] (out, zero-padded past R), thread tid's share of it (of nt): with parts, the
// sum of the threads' partial sums (thread u's at parts + u · stride), in thread order; else the binding's
// lora_act [M, R].
inline void gather_lora_act(const float* parts, int64_t stride, const float* lora_act, int64_t M, int64_t R,
                            int64_t Rp, int tid, int nt, float* out) {
  int64_t i_lo, i_hi;
  thread_share(M * Rp, tid, nt, i_lo, i_hi);
  for (int64_t i = i_lo; i < i_hi; ++i) {
    const int64_t m = i / Rp, r = i % Rp;
    float t = 0.0f;
    if (parts != nullptr) {
      for (int u = 0; u < nt; ++u) t += parts[u * stride + i];
    } else if (r < R) {
      t = lora_act[m * R + r];
    }
    out[i] = t;
  }
}

// Bytes of n T (at least one) rounded up to 64: aligned_alloc wants a multiple of the alignment.
template <typename T>
inline size_t aligned_bytes(int64_t n) {
  return (static_cast<size_t>(n > 0 ? n : 1) * sizeof(T) + 63) & ~size_t{63};
}

// 64-byte aligned memory for n T (at least one), or null.
template <typename T>
inline T* alloc_aligned(int64_t n) {
#if defined(_MSC_VER)
  return static_cast<T*>(_aligned_malloc(aligned_bytes<T>(n), 64));
#else
  return static_cast<T*>(std::aligned_alloc(64, aligned_bytes<T>(n)));
#endif
}

inline void free_aligned(void* p) {
#if defined(_MSC_VER)
  _aligned_free(p);
#else
  std::free(p);
#endif
}

// An uninitialised, 64-byte aligned array of n T, freed on scope exit. The ISA paths use it instead
// of std::vector: a std:: template instantiated in a TU built with -mavx2 (or wider) is an inline
// function with external linkage, and the linker may keep that copy for a narrower path too.
// Allocate outside OpenMP regions: a bad_alloc must not escape one.
template <typename T>
struct Buffer {
  T* p = nullptr;
  explicit Buffer(int64_t n) : p(alloc_aligned<T>(n)) {
    if (p == nullptr) throw std::bad_alloc();
  }
  ~Buffer() { free_aligned(p); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

// The calling thread's reusable block (ReusedBuffer): grown on demand, freed when the thread exits.
struct ThreadBlock {
  void* p = nullptr;
  size_t bytes = 0;
  bool in_use = false;
  ~ThreadBlock() { free_aligned(p); }
};

inline ThreadBlock& thread_block() {
  static thread_local ThreadBlock block;
  return block;
}

// Like Buffer, but backed by a per-thread block that stays allocated between calls (up to
// kMaxReusedBytes; larger requests, or a second one alive at the same time, get their own memory).
// For the GEMM's unpacked activations, M·K bytes (50 MB at M = 4096, K = 12288): fresh memory is
// fresh pages every call, and their faults and zeroing cost ~4% of the GEMM on Zen 5. A thread thus
// keeps its largest such request (at most 64 MiB) until it exits.
constexpr size_t kMaxReusedBytes = size_t{64} << 20;

template <typename T>
struct ReusedBuffer {
  T* p = nullptr;
  explicit ReusedBuffer(int64_t n) {
    const size_t bytes = aligned_bytes<T>(n);
    ThreadBlock& block = thread_block();
    if (bytes > kMaxReusedBytes || block.in_use) {
      p = alloc_aligned<T>(n);
      if (p == nullptr) throw std::bad_alloc();
      return;
    }
    if (block.bytes < bytes) {
      free_aligned(block.p);
      block.bytes = 0;
      block.p = alloc_aligned<uint8_t>(static_cast<int64_t>(bytes));
      if (block.p == nullptr) throw std::bad_alloc();
      block.bytes = bytes;
    }
    block.in_use = true;
    reused_ = true;
    p = static_cast<T*>(block.p);
  }
  ~ReusedBuffer() {
    if (reused_)
      thread_block().in_use = false;
    else
      free_aligned(p);
  }
  ReusedBuffer(const ReusedBuffer&) = delete;
  ReusedBuffer& operator=(const ReusedBuffer&) = delete;

 private:
  bool reused_ = false;
};

}  // namespace
}  // namespace svdq::cpu
