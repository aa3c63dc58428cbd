// Shared by the .cu files: error strings, device setup, and the few PTX instructions the kernels use.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#include "kernels.h"

namespace svdq::cuda {

inline std::string cuda_error(const char* what, cudaError_t e) {
  std::string msg = std::string(what) + ": " + cudaGetErrorName(e) + " (" + cudaGetErrorString(e) + ")";
  if (e == cudaErrorInsufficientDriver || e == cudaErrorNoDevice)
    msg += "; this module carries CUDA runtime " + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) +
           " and needs an NVIDIA driver supporting it and a visible GPU";
  return msg;
}

// This module links its own (static) CUDA runtime, whose current device is not torch's: select the
// tensors' device explicitly before every launch. The driver context is shared, so torch's stream
// handle is valid here.
inline std::string use_device(int device, int* cc) {
  cudaError_t e = cudaSetDevice(device);
  if (e != cudaSuccess) {
    cudaGetLastError();  // do not leave a sticky non-fatal error for the next call
    return cuda_error(("cannot use CUDA device " + std::to_string(device)).c_str(), e);
  }
  return device_capability(device, cc);
}

// SVDQ_CUDA_SYNC=1: synchronize after every launch so that a fault is reported by the kernel that
// caused it (debugging; launches are asynchronous otherwise and faults surface in a later torch call).
inline bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("SVDQ_CUDA_SYNC");
    return v != nullptr && *v != '\0' && std::string(v) != "0";
  }();
  return on;
}

inline cudaError_t finish_launch(cudaStream_t stream) {
  cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess && sync_after_launch()) e = cudaStreamSynchronize(stream);
  return e;
}

// ---------------------------------------------------------------------------- device helpers

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; `valid == false` writes zeros (src is not read).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices (8 rows x 16 bytes each); lanes 8i..8i+7 give the row addresses of matrix i.
// Lane l receives 4 bytes of each matrix: row l/4, bytes 4*(l%4)..+3.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// Exact for |v| < 2^22: the integer lands in the mantissa of 1.5 * 2^23. Cheaper than I2F, which
// runs at a fraction of the FP32 rate (16/clk/SM on sm_8x/9x) and would bound the per-group scaling.
__device__ __forceinline__ float small_int_to_float(int v) {
  return __int_as_float(v + 0x4B400000) - 12582912.0f;
}

template <typename T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float to_float(float v) { return v; }
  static __device__ __forceinline__ float from_float(float v) { return v; }
};
template <>
struct Convert<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
  static __device__ __forceinline__ uint32_t bits(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
};
template <>
struct Convert<__half> {
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_float(float v) { return __float2half_rn(v); }
  static __device__ __forceinline__ uint32_t bits(__half v) { return __half_as_ushort(v); }
};

// Eight consecutive elements of a 16-byte aligned row as float32.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&v)[8]) {
  if constexpr (sizeof(T) == 4) {
    const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
  } else {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = Convert<T>::to_float(h[j]);
  }
}

// Two adjacent outputs: one 64/32-bit store when `vector` (both in range and the pair aligned), else one or two
// scalar stores (`both`: the second is in range).
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* p, float v0, float v1, bool both, bool vector) {
  if (vector) {
    if constexpr (sizeof(OutT) == 4) {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    } else {
      *reinterpret_cast<uint32_t*>(p) = Convert<OutT>::bits(Convert<OutT>::from_float(v0)) |
                                        (Convert<OutT>::bits(Convert<OutT>::from_float(v1)) << 16);
    }
  } else {
    p[0] = Convert<OutT>::from_float(v0);
    if (both) p[1] = Convert<OutT>::from_float(v1);
  }
}

}  // namespace svdq::cuda
