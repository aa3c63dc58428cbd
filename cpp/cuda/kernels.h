// CUDA kernel interface, as seen from bindings/cuda.cpp (compiled by the host compiler: no CUDA headers).
//
// Contract (docs/design.md §1, diffusers_svdquant/reference.py), on top of cpp/cpu/kernels.h's:
//   * Pointers are device pointers on `device`, contiguous and 16-byte aligned (ops.py guarantees
//     both); `stream` is a cudaStream_t as an integer (torch.cuda.current_stream().cuda_stream).
//   * Every function returns "" on success, or a message saying what failed (a CUDA error, a
//     device without the needed compute capability); bindings/cuda.cpp raises it as RuntimeError.
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

// ---- W4A16 (weight-only; cpp/cuda/gemm_w4a16.cu, gemv_w4a16.cu, docs/design.md §4) ----------------------
//   y = x̂ Wᵀ + (x̂ lora_down) lora_upᵀ + bias,  x̂ = x / smooth,  W[n, k] = q[n, k] · wscales[n, g] + wmins[n, g]
// x [M, K] and every float tensor in one 16-bit dtype (1 bfloat16, 2 float16); qweight uint8 [N, K/2] unsigned
// codes (element 2j in the low nibble); wscales, wmins [N, K/64]; smooth [K]; lora_down [K, R]; lora_up [N, R];
// bias [N] or null; y [M, N]. x, qweight, smooth and the workspace 16-byte aligned; float32 accumulation throughout.
enum class W4A16Path : int { kAuto = 0, kGemv = 1, kGemm = 2 };
// kAuto runs the GEMV (CUDA-core FMAs, weights streamed once) up to this many rows, the mma GEMM above.
constexpr int kW4A16GemvMaxRows = 16;

// How one call runs, from its sizes and the device's SM count alone (so the caller can size the workspace,
// and tests can check the plan without a GPU). Offsets are in bytes into the workspace, 16-byte aligned.
struct W4A16Plan {
  bool gemv = false;
  int gemv_rows = 0;     // GEMV: the kernel's row count, M rounded up to 1, 2, 4, 8 or 16
  int gemv_ksplit = 1;   // GEMV: K split over this many blocks (grid.y) ...
  int gemv_kslice = 0;   // ... of this many k each (a multiple of 256; the last one may be shorter)
  int gemm_bm = 0;       // GEMM: rows per block, 64 or 128
  int pro_rows = 0;      // prologue: rows of x it reads (0 when it only computes 1 / smooth)
  int pro_kslices = 1;   // prologue: K split over this many blocks ...
  int pro_kslice = 0;    // ... of this many k each (a multiple of 128)
  int64_t counters = 0;      // int32 split-K arrival counters at offset 0, zeroed by every call:
  int64_t pro_counters = 0;  // the prologue's first, then the GEMV's
  int64_t lora_act_off = -1, lora_part_off = -1, xhat_off = -1, xsum_off = -1, partial_off = -1,
          inv_smooth_off = -1;  // float32 regions, -1 when not used
  int64_t bytes = 0;            // workspace size
};
// "" and *plan filled, or what is wrong with the sizes. sms: the device's multiprocessor count (>= 1).
std::string plan_w4a16(int64_t M, int64_t N, int64_t K, int64_t R, W4A16Path path, int sms, W4A16Plan* plan);

struct W4A16Args {
  const void* x;
  const uint8_t* qweight;
  const void* wscales;
  const void* wmins;
  const void* smooth;
  const void* lora_down;
  const void* lora_up;
  const void* bias;  // null: none
  void* y;
  void* workspace;  // plan_w4a16(...).bytes bytes
  int64_t M, N, K, R;
  int dtype;
};
// Up to three launches on `stream`: a memset of the split-K counters, the prologue (x̂, its 32-element sums,
// 1 / smooth, x̂ lora_down, as the path needs them) and the GEMV or GEMM with the low-rank + bias epilogue.
std::string linear_w4a16(const W4A16Args& args, W4A16Path path, int sms, int device, uintptr_t stream);

// reference.fixed_point_add (cpu/fixedpoint.h): ints [packed_size(K)] += the packed float32 item in units
// 2^(s_j + s_l + offset), exponents int64 [K] within ±512; one launch on `stream`, which sets *ok (int32, 1 before
// the call) to 0 when a unit or a diagonal reached 2^62.
std::string fixed_point_add(int64_t* ints, const float* item, const int64_t* exponents, int64_t K, int64_t offset,
                            int* ok, int device, uintptr_t stream);

}  // namespace svdq::cuda
