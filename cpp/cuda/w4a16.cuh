// Shared by gemm_w4a16.cu and gemv_w4a16.cu: the launch parameters of linear_w4a16's kernels and the device
// helpers both use. The plan (kernels.h W4A16Plan) decides which kernels run and where their scratch lives.
#pragma once

#include <type_traits>

#include "common.cuh"

namespace svdq::cuda::w4a16 {

// Pointers into the caller's tensors and workspace, sizes as int (checked by linear_w4a16).
struct Params {
  const void* x;             // [M, K] T
  const uint8_t* qweight;    // [N, K/2]
  const uint16_t* wscales;   // [N, K/64] T bits
  const uint16_t* wmins;     // [N, K/64] T bits
  const void* smooth;        // [K] T
  const void* lora_down;     // [K, R] T
  const void* lora_up;       // [N, R] T
  const void* bias;          // [N] T or null
  void* y;                   // [M, N] T
  int* counters;             // the prologue's split-K arrival counters, one per (row tile, rank tile), zeroed
  int* gemv_counters;        // the GEMV's, one per column tile, zeroed
  float* xhat;               // [M, K] x / smooth (GEMV)
  float* xsum;               // [M, K/32] sums of x̂ over 32 consecutive k (GEMV)
  float* inv_smooth;         // [K] 1 / smooth (GEMM)
  float* lora_act;           // [M, R] x̂ lora_down
  float* lora_part;          // [pro_kslices, M, R] its per-slice partial sums (pro_kslices > 1)
  float* partial;            // [gemv_ksplit, M, N] the GEMV's per-slice partial sums (gemv_ksplit > 1)
  int M, N, K, R;
};

// Launchers (gemv_w4a16.cu): T = __nv_bfloat16 or __half.
template <typename T>
cudaError_t launch_prologue(const Params& p, const W4A16Plan& plan, cudaStream_t stream);
template <typename T>
cudaError_t launch_gemv(const Params& p, const W4A16Plan& plan, cudaStream_t stream);
// gemm_w4a16.cu
template <typename T>
cudaError_t launch_gemm(const Params& p, const W4A16Plan& plan, int device, cudaStream_t stream);

// GEMV: 4 warps of 8 columns each (4 column lanes x 2 columns; 8 k lanes), K in steps of 256 per warp.
constexpr int kGemvThreads = 128;
constexpr int kGemvColsPerLane = 2;
constexpr int kGemvColsPerBlock = 32;
constexpr int kGemvStepK = 256;
constexpr int kGemvSmemBudget = 48 * 1024;  // x̂ and its sums for the block's K slice: no opt-in needed
// Prologue: 32 rows x 32 ranks per block, K in chunks of 128.
constexpr int kProRows = 32;
constexpr int kProChunk = 128;
constexpr int kProRankTile = 32;
// GEMM: 128 columns, BM (64 or 128) rows, one 64-group per pipeline stage.
constexpr int kGemmBN = 128;

// ---------------------------------------------------------------------------- device helpers

// The eight unsigned nibbles of w (element e in bits 4e..4e+3) as exact floats, with no shift for elements
// 0-3 and one for 4-7: nibble e of a 16-bit half, OR-ed into the mantissa of 2^(23-4e), is 2^(23-4e) + q
// (one LOP3 and one FADD each; I2F runs at a quarter of the FP32 rate).
__device__ __forceinline__ void nibbles_to_float(uint32_t w, float (&q)[8]) {
  const uint32_t hi = w >> 16;
  q[0] = __uint_as_float((w & 0x000Fu) | 0x4B000000u) - 8388608.0f;
  q[1] = __uint_as_float((w & 0x00F0u) | 0x49000000u) - 524288.0f;
  q[2] = __uint_as_float((w & 0x0F00u) | 0x47000000u) - 32768.0f;
  q[3] = __uint_as_float((w & 0xF000u) | 0x45000000u) - 2048.0f;
  q[4] = __uint_as_float((hi & 0x000Fu) | 0x4B000000u) - 8388608.0f;
  q[5] = __uint_as_float((hi & 0x00F0u) | 0x49000000u) - 524288.0f;
  q[6] = __uint_as_float((hi & 0x0F00u) | 0x47000000u) - 32768.0f;
  q[7] = __uint_as_float((hi & 0xF000u) | 0x45000000u) - 2048.0f;
}

template <typename T>
__device__ __forceinline__ float bits_to_float(uint16_t b) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(b) << 16);
  } else {
    return __half2float(__ushort_as_half(b));
  }
}

// Two floats rounded to T (nearest even), the first in the low half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  return Convert<T>::bits(Convert<T>::from_float(lo)) | (Convert<T>::bits(Convert<T>::from_float(hi)) << 16);
}

// bias[n] + lora_act[m, :] · lora_up[n, :] in float32 (the epilogue of the GEMV and of the split-K fixup).
template <typename T>
__device__ __forceinline__ float lora_term(const Params& p, int m, int n) {
  const T* up = static_cast<const T*>(p.lora_up) + static_cast<size_t>(n) * p.R;
  const float* la = p.lora_act + static_cast<size_t>(m) * p.R;
  float v = 0.f;
  for (int r = 0; r < p.R; ++r) v = fmaf(la[r], Convert<T>::to_float(up[r]), v);
  return v;
}

template <typename T>
__device__ __forceinline__ float bias_term(const Params& p, int n) {
  return p.bias != nullptr ? Convert<T>::to_float(static_cast<const T*>(p.bias)[n]) : 0.f;
}

// Split-K: after this block wrote its partial sums, true in exactly one block of the `arrivals` that share
// `counter` (the last to arrive), which may then read every block's partial sums. Call from all threads.
__device__ __forceinline__ bool last_to_arrive(int* counter, int arrivals) {
  __shared__ bool last;
  __threadfence();  // this thread's partial sums are visible device-wide before the count says so
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(counter, 1) == arrivals - 1;
  __syncthreads();
  if (last) __threadfence();
  return last;
}

}  // namespace svdq::cuda::w4a16
