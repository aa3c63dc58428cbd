// CUDA kernel interface, as seen from bindings.cpp (compiled by the host compiler: no CUDA headers).
//
// Contract (docs/design.md §1, diffusers_svdquant/reference.py), on top of cpp/cpu/kernels.h's:
//   * Pointers are device pointers on `device`, contiguous and 16-byte aligned (ops.py guarantees
//     both); `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
//   * Every function returns "" on success, or a message saying what failed (a CUDA error, a
//     device without the needed compute capability); bindings.cpp raises it as RuntimeError.
//   * Kernels are launched asynchronously on `stream`; nothing here synchronizes.
#pragma once

#include <cstdint>
#include <string>

namespace svdq::cuda {

constexpr int kGroupSize = 64;
// Output columns per thread block; the packed weights are padded to a multiple of it.
constexpr int kTileN = 128;
// Bytes of packed weights per (64 output columns, one 64-group): 64 columns x 32 bytes.
constexpr int kPanelBytes = 2048;

// Which tensor-core instruction the GEMM uses. kAuto: m16n8k64 s4 on compute capability 8.x,
// m16n8k32 s8 (int4 expanded to int8 in registers) on 9.0 and newer.
enum class MmaPath : int { kAuto = 0, kS4 = 1, kS8 = 2 };

// x: [M, K] `dtype` (0 float32, 1 bfloat16, 2 float16); smooth: [K] and lora_down: [K, R] in the same dtype.
// Writes q_x uint8 [M, K/2], s_x float32 [M, K/64], lora_act float32 [M, R]. K % 64 == 0, M >= 1.
std::string quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                         float* lora_act, int64_t M, int64_t K, int64_t R, int dtype, int device,
                         uintptr_t stream);

// The GEMM on the mma-fragment weight layout (diffusers_svdquant/ops.py `pack_mma_weights`),
// Np = N rounded up to kTileN:
//   wq: uint8 [Np/64, K/64, kPanelBytes]; sw: float32 [K/64, Np]; lora_up: float32 [R, Np];
//   bias: float32 [Np] or null.
// q_x: uint8 [M, K/2]; s_x: float32 [M, K/64]; lora_act: float32 [M, R]; y: [M, N] in `out_dtype`.
struct GemmArgs {
  const uint8_t* q_x;
  const float* s_x;
  const float* lora_act;
  const uint8_t* wq;
  const float* sw;
  const float* lora_up;
  const float* bias;
  void* y;
  int64_t M, N, K, R;
  int out_dtype;
};
std::string gemm_w4a4(const GemmArgs& args, MmaPath path, int device, uintptr_t stream);

// Compute capability of `device` as 10 * major + minor, or an error message.
std::string device_capability(int device, int* cc);
// The path kAuto resolves to on a device of compute capability `cc` ("s4" / "s8"), or "" when the
// kernels cannot run there (cc < 8.0).
const char* auto_mma_path(int cc);

}  // namespace svdq::cuda
