// CPU kernel interface: one table of function pointers per instruction-set path.
//
// Contract shared by every path (docs/design.md §1, diffusers_svdquant/reference.py):
//   * Matrices are row-major and contiguous; sizes are element counts (int64).
//   * INT4 codes are two's complement in [-8, 7], packed two per byte along K: element 2j in the
//     low nibble, element 2j+1 in the high nibble.
//   * Activation groups are kGroupSize = 64 consecutive elements of a row.
//   * Callers (cpp/bindings/) have validated the arguments; kernels do not check them again.
//
// Each path lives in its own translation unit and namespace (svdq::cpu::generic,
// svdq::cpu::avx2, ...) so the linker can never merge code compiled with wider ISA flags into a
// narrower path. This header therefore declares only types and functions; it defines no inline
// code that could be instantiated under different flags.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gemm_layout.h"

namespace svdq::cpu {

constexpr int64_t kGroupSize = 64;

// The Python side passes these codes (ops.py `_DTYPE_CODES`).
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Bytes per element of a DType.
constexpr int64_t dtype_size(DType d) { return d == DType::kFloat32 ? 4 : 2; }

// x: [M, K] `dtype`; smooth: [K] `dtype`; lora_down: [K, R] `dtype` (may be null when R == 0).
// q_x: uint8 [M, K/2]; s_x: float32 [M, K/64]; lora_act: float32 [M, R] (null when R == 0).
// K is a multiple of 64 (K == 0 allowed: lora_act is then zeros). num_threads >= 1.
using QuantizeActFn = void (*)(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x,
                               float* s_x, float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype,
                               int num_threads);

// W4A4 GEMM with the low-rank + bias epilogue on the canonical weights (GemmArgs, gemm_layout.h):
// y[m, n] = sum_g s_x[m,g] sw[n,g] (q_x[m,g,:] . q_w[n,g,:]) + lora_act[m] . lora_up[n] + bias[n].
using GemmW4A4Fn = void (*)(const GemmArgs& args);
// Tile t of the kernel layout (gemm_layout.h) from the canonical weights in `args`; M, q_x, s_x,
// lora_act and y are not read. Exposed so tests can compare it with ops.pack_gemm_weights.
using PackTileFn = void (*)(const GemmArgs& args, int64_t t, const Tile& out);

// The weight-only (W4A16) linear, reference.linear_w4a16: unsigned codes q in [0, 15] packed as q_x is,
// W[n, k] = q · wscales[n, k/64] + wmins[n, k/64]; y = x̂ Wᵀ + lora_act lora_upᵀ + bias with x̂ = x / smooth,
// every float tensor in `dtype`, float32 arithmetic, y rounded once to `dtype`. lora_act (x̂ lora_down,
// float32 [M, R]) comes from the path's quantize_act, called by the binding before the kernel, except for a
// kernel that computes it itself from lora_down (KernelTable::linear_w4a16_lora): then lora_act is null.
struct W4A16Args {
  const void* x;           // [M, K] dtype
  const void* smooth;      // [K] dtype
  const float* lora_act;   // [M, R] float32 (null when R == 0, or for a kernel that computes it)
  const void* lora_down;   // [K, R] dtype
  const uint8_t* qweight;  // [N, K/2] unsigned nibbles, element 2j low
  const void* wscales;     // [N, K/64] dtype
  const void* wmins;       // [N, K/64] dtype
  const void* lora_up;     // [N, R] dtype (null when R == 0)
  const void* bias;        // [N] dtype, or null
  void* y;                 // [M, N] dtype
  int dtype;               // DType of every float tensor above but lora_act
  int64_t M, N, K, R;
  int num_threads;
};
using LinearW4A16Fn = void (*)(const W4A16Args& args);

// The dequantized weight of rows [0, N) of a W4A16 layer over the smoothing: out[n * ldo + k] =
// (q · s + m) · (1 / smooth[k]) in float32 (1 / smooth rounded to float32 once; smooth null: no factor),
// rounded once to `odtype`. For the large-M path, which hands torch.mm dequantized panels.
struct DequantW4A16Args {
  const uint8_t* qweight;  // [N, K/2]
  const void* wscales;     // [N, K/64] wdtype
  const void* wmins;       // [N, K/64] wdtype
  const void* smooth;      // [K] wdtype, or null
  void* out;               // [N, K] odtype, rows ldo elements apart (ldo >= K)
  int wdtype, odtype;
  int64_t N, K, ldo;
  int num_threads;
};
using DequantW4A16Fn = void (*)(const DequantW4A16Args& args);

struct KernelTable {
  QuantizeActFn quantize_act;
  GemmW4A4Fn gemm_w4a4;
  PackTileFn pack_tile;
  LinearW4A16Fn linear_w4a16;
  DequantW4A16Fn dequantize_w4a16;
  // The many-rows W4A16 linear on matrix tiles (operands rounded to bfloat16), null on paths without one.
  LinearW4A16Fn linear_w4a16_tiles = nullptr;
  // quantize_act for the whole W4A4 linear (_C.linear), whose output is rounded to x's dtype: may compute
  // lora_act from bf16-rounded x̂ when x is bfloat16 (docs/design.md §1). Null: quantize_act.
  QuantizeActFn quantize_act_linear = nullptr;
  // linear_w4a16 computes lora_act itself from lora_down (the x86 GEMV, its threads splitting K), so the
  // binding passes it none.
  bool linear_w4a16_lora = false;
  // The few-rows W4A16 linear for bfloat16 input with x̂ in 16-bit fixed point per group (vpdpbusd or vpmaddubsw;
  // every float tensor bfloat16, lora_act computed itself), null on the generic and Arm paths.
  LinearW4A16Fn linear_w4a16_bf16 = nullptr;
  // The many-rows W4A16 linear for bfloat16 input in the same fixed point (vpdpbusd, columns in the lanes; every
  // float tensor bfloat16, lora_act from the binding), null on paths without VNNI.
  LinearW4A16Fn linear_w4a16_bf16_gemm = nullptr;
};

namespace generic {
void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads);
void gemm_w4a4(const GemmArgs& args);
void pack_tile(const GemmArgs& args, int64_t t, const Tile& out);
void linear_w4a16(const W4A16Args& args);
void dequantize_w4a16(const DequantW4A16Args& args);
}  // namespace generic

#if defined(SVDQ_HAVE_AVX2)
namespace avx2 {
void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads);
void gemm_w4a4(const GemmArgs& args);
void pack_tile(const GemmArgs& args, int64_t t, const Tile& out);
// Microbenchmark (peak_loop.inc): a tight vpmaddubsw + vpaddw loop (about iters steps of 8 instructions
// per thread), the int8 dot-product peak the GEMM is measured against; returns the ops done (2 per
// product), which the caller times (bindings/cpu.cpp: no std:: template is instantiated under ISA flags,
// see scalar.h). Not in the table: not a kernel.
double int8_peak_ops(int num_threads, int64_t iters);
// W4A16 on ymm (w4a16_avx2.cpp: w4a16_x86.inc), for the avx2 and avxvnni paths.
void linear_w4a16(const W4A16Args& args);
void dequantize_w4a16(const DequantW4A16Args& args);
// The few-rows bfloat16 GEMV on ymm with vpmaddubsw (w4a16_gemv_bf16_avx2.cpp), the avx2 path's linear_w4a16_bf16.
void linear_w4a16_bf16(const W4A16Args& args);
}  // namespace avx2
#endif

// quantize_act on zmm (quantize_avx512.cpp: quantize_x86.inc) and W4A16 on zmm (w4a16_avx512.cpp:
// w4a16_x86.inc), for the avx512vnni path.
namespace avx512 {
void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads);
void linear_w4a16(const W4A16Args& args);
void dequantize_w4a16(const DequantW4A16Args& args);
// The few-rows bfloat16 GEMV (w4a16_gemv_bf16.cpp), linear_w4a16_bf16 of the avx512vnni,
// avx512bf16 and amx paths.
void linear_w4a16_bf16(const W4A16Args& args);
// The many-rows fixed-point bfloat16 linear on zmm (w4a16_gemm_fixed_avx512.cpp), linear_w4a16_bf16_gemm of the
// avx512vnni, avx512bf16 and amx paths.
void linear_w4a16_bf16_gemm(const W4A16Args& args);
}  // namespace avx512

#if defined(SVDQ_HAVE_AVX512BF16)
// W4A16 on zmm vdpbf16ps (w4a16_dpbf16.cpp), the avx512bf16 path's linear_w4a16_tiles.
namespace avx512bf16 {
void linear_w4a16(const W4A16Args& args);
}  // namespace avx512bf16
#endif

#if defined(SVDQ_HAVE_AMX)
// W4A16 on AMX-BF16 tiles (w4a16_amx.cpp), the amx path's linear_w4a16_tiles.
namespace amx {
void linear_w4a16(const W4A16Args& args);
}  // namespace amx
#endif

// The VNNI GEMMs (gemm_avxvnni.cpp, gemm_avx512vnni.cpp: the GEMM of gemm_driver.inc with vpdpbusd).
namespace avxvnni {
void gemm_w4a4(const GemmArgs& args);
void pack_tile(const GemmArgs& args, int64_t t, const Tile& out);
double int8_peak_ops(int num_threads, int64_t iters);  // the vpdpbusd loop
// The few-rows bfloat16 GEMV on ymm with vpdpbusd (w4a16_gemv_bf16_avxvnni.cpp), the avxvnni path's
// linear_w4a16_bf16.
void linear_w4a16_bf16(const W4A16Args& args);
// The many-rows fixed-point bfloat16 linear on ymm (w4a16_gemm_fixed_avxvnni.cpp), the avxvnni path's
// linear_w4a16_bf16_gemm.
void linear_w4a16_bf16_gemm(const W4A16Args& args);
}  // namespace avxvnni
namespace avx512vnni {
void gemm_w4a4(const GemmArgs& args);
void pack_tile(const GemmArgs& args, int64_t t, const Tile& out);
double int8_peak_ops(int num_threads, int64_t iters);  // the vpdpbusd loop
}  // namespace avx512vnni
// The avx512vnni GEMM with the tile path's bf16 low-rank branch on AMX tiles (gemm_avx512amx.cpp), and the
// zmm quantize_act with the down projection on AMX tiles for a bf16 linear (quantize_avx512amx.cpp).
namespace avx512amx {
void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads);
void gemm_w4a4(const GemmArgs& args);
void pack_tile(const GemmArgs& args, int64_t t, const Tile& out);
}  // namespace avx512amx

// AArch64 (Advanced SIMD is part of the base ISA): quantize_act on NEON (quantize_neon.cpp, no flags), shared
// by the Arm paths; the W4A4 GEMMs with sdot (gemm_dotprod.cpp, +dotprod) and smmla (gemm_i8mm.cpp, +i8mm).
// W4A16 and pack_tile stay generic's there.
namespace neon {
void quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                  float* lora_act, int64_t M, int64_t K, int64_t R, DType dtype, int num_threads);
}  // namespace neon
namespace dotprod {
void gemm_w4a4(const GemmArgs& args);
double int8_peak_ops(int num_threads, int64_t iters);  // the sdot loop (peak_loop_neon.inc)
}  // namespace dotprod
namespace i8mm {
void gemm_w4a4(const GemmArgs& args);
double int8_peak_ops(int num_threads, int64_t iters);  // the smmla loop
}  // namespace i8mm

// Dispatcher (dispatch.cpp, compiled without ISA flags).

// The table of the selected path. Selection is process-wide; the default is the best verified path this
// CPU and OS support.
const KernelTable& kernels();
// Name of the selected path ("generic", "avx2", "dotprod", ...).
const char* current_isa();
// Paths this CPU can run (x86: cpuid and XCR0; Arm: HWCAP or sysctl), "generic" first, best last.
std::vector<std::string> supported_isas();
// Paths compiled into this build, whether or not this CPU can run them.
std::vector<std::string> known_isas();
// Selects a path by name. Returns false (and changes nothing) if it is unknown or unsupported.
bool set_isa(const std::string& name);

// finite.cpp (no ISA flags): index of the first buffer holding NaN or ±inf, or -1. data[b] holds numel[b]
// elements of dtypes[b]; num_threads >= 1.
int64_t first_nonfinite(const std::vector<const void*>& data, const std::vector<int64_t>& numel,
                        const std::vector<DType>& dtypes, int num_threads);

}  // namespace svdq::cpu
