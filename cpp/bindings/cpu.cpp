// The CPU entry points of _C: the kernels of the selected CPU path, the path itself, and the load-time
// NaN / inf scans. Pointers arrive as Python ints and are validated here (common.h) before any kernel runs.

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bindings/common.h"
#include "cpu/finite.h"
#include "cpu/kernels.h"

namespace svdq::bindings {
namespace {

using svdq::cpu::DType;

void quantize_act(const py::int_& x_, const py::int_& smooth_, const py::int_& lora_down_,
                  const py::int_& q_x_, const py::int_& s_x_, const py::int_& lora_act_, int64_t M, int64_t K,
                  int64_t R, int64_t dtype, int64_t group_size, int64_t num_threads) {
  const char* fn = "quantize_act";
  const uintptr_t x = as_ptr(fn, "x", x_), smooth = as_ptr(fn, "smooth", smooth_),
                  lora_down = as_ptr(fn, "lora_down", lora_down_), q_x = as_ptr(fn, "q_x", q_x_),
                  s_x = as_ptr(fn, "s_x", s_x_), lora_act = as_ptr(fn, "lora_act", lora_act_);
  check_size(fn, "M", M);
  check_size(fn, "K", K);
  check_size(fn, "R", R);
  if (group_size != svdq::cpu::kGroupSize)
    fail(std::string(fn) + ": group_size must be " + std::to_string(svdq::cpu::kGroupSize) + ", got " +
         std::to_string(group_size));
  if (K % 2 != 0) fail(std::string(fn) + ": K must be even, got K=" + std::to_string(K));
  if (K % group_size != 0)
    fail(std::string(fn) + ": K must be a multiple of group_size=" + std::to_string(group_size) +
         ", got K=" + std::to_string(K));
  check_dtype(fn, "dtype", dtype);
  check_threads(fn, num_threads);
  check_product(fn, "M", M, "K", K);
  check_product(fn, "K", K, "R", R);
  check_product(fn, "M", M, "R", R);
  check_ptr(fn, "x", x, M * K);
  check_ptr(fn, "smooth", smooth, M > 0 ? K : 0);  // only read when there are rows
  check_ptr(fn, "lora_down", lora_down, M > 0 ? K * R : 0);
  check_ptr(fn, "q_x", q_x, M * (K / 2));
  check_ptr(fn, "s_x", s_x, M * (K / group_size));
  check_ptr(fn, "lora_act", lora_act, M * R);
  if (M == 0) return;

  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  py::gil_scoped_release release;
  k.quantize_act(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(smooth),
                 reinterpret_cast<const void*>(lora_down), reinterpret_cast<uint8_t*>(q_x),
                 reinterpret_cast<float*>(s_x), reinterpret_cast<float*>(lora_act), M, K, R,
                 static_cast<DType>(dtype), static_cast<int>(num_threads));
}

// The canonical weights of a gemm (docs/design.md §2), validated: qweight [N, K/2] uint8; wscales [N, K/64],
// lora_up [N, R] and bias [N] (null: none) in `wdtype`.
svdq::cpu::GemmArgs weight_args(const char* fn, const py::int_& qweight_, const py::int_& wscales_,
                                const py::int_& lora_up_, const py::int_& bias_, int64_t N, int64_t K,
                                int64_t R, int64_t wdtype) {
  svdq::cpu::GemmArgs a{};
  const uintptr_t qweight = as_ptr(fn, "qweight", qweight_), wscales = as_ptr(fn, "wscales", wscales_),
                  lora_up = as_ptr(fn, "lora_up", lora_up_), bias = as_ptr(fn, "bias", bias_);
  check_size(fn, "N", N);
  check_size(fn, "K", K);
  check_size(fn, "R", R);
  check_groups(fn, K);
  check_dtype(fn, "wdtype", wdtype);
  check_product(fn, "N", N + svdq::cpu::kTileN, "K", K);
  check_product(fn, "N", N + svdq::cpu::kTileN, "R", R);
  check_ptr(fn, "qweight", qweight, N * (K / 2));
  check_ptr(fn, "wscales", wscales, N * (K / svdq::cpu::kGroupSize));
  check_ptr(fn, "lora_up", lora_up, N * R);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight);
  a.wscales = reinterpret_cast<const void*>(wscales);
  a.lora_up = reinterpret_cast<const void*>(lora_up);
  a.bias = reinterpret_cast<const void*>(bias);  // null: no bias
  a.wdtype = static_cast<int>(wdtype);
  a.N = N;
  a.K = K;
  a.R = R;
  return a;
}

void gemm_w4a4(const py::int_& q_x_, const py::int_& s_x_, const py::int_& lora_act_,
               const py::int_& qweight_, const py::int_& wscales_, const py::int_& lora_up_,
               const py::int_& bias_, const py::int_& y_, int64_t M, int64_t N, int64_t K, int64_t R,
               int64_t wdtype, int64_t ydtype, int64_t num_threads) {
  const char* fn = "gemm_w4a4";
  svdq::cpu::GemmArgs a = weight_args(fn, qweight_, wscales_, lora_up_, bias_, N, K, R, wdtype);
  check_dtype(fn, "ydtype", ydtype);
  const uintptr_t q_x = as_ptr(fn, "q_x", q_x_), s_x = as_ptr(fn, "s_x", s_x_),
                  lora_act = as_ptr(fn, "lora_act", lora_act_), y = as_ptr(fn, "y", y_);
  check_size(fn, "M", M);
  check_threads(fn, num_threads);
  check_product(fn, "M", M, "K", K);
  check_product(fn, "M", M, "N", N);
  check_product(fn, "M", M, "R", R);
  check_ptr(fn, "q_x", q_x, M * (K / 2));
  check_ptr(fn, "s_x", s_x, M * (K / svdq::cpu::kGroupSize));
  check_ptr(fn, "lora_act", lora_act, M * R);
  check_ptr(fn, "y", y, M * N);
  if (M == 0 || N == 0) return;
  a.q_x = reinterpret_cast<const uint8_t*>(q_x);
  a.s_x = reinterpret_cast<const float*>(s_x);
  a.lora_act = reinterpret_cast<const float*>(lora_act);
  a.y = reinterpret_cast<void*>(y);
  a.ydtype = static_cast<int>(ydtype);
  a.M = M;
  a.num_threads = static_cast<int>(num_threads);
  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  py::gil_scoped_release release;
  k.gemm_w4a4(a);
}

// The whole linear in one call: quantize_act into scratch buffers, then gemm_w4a4. x, smooth and
// lora_down share the weights' dtype (the model dtype), and so does y [M, N].
void linear(const py::int_& x_, const py::int_& smooth_, const py::int_& lora_down_, const py::int_& qweight_,
            const py::int_& wscales_, const py::int_& lora_up_, const py::int_& bias_, const py::int_& y_,
            int64_t M, int64_t N, int64_t K, int64_t R, int64_t dtype, int64_t num_threads) {
  const char* fn = "linear";
  svdq::cpu::GemmArgs a = weight_args(fn, qweight_, wscales_, lora_up_, bias_, N, K, R, dtype);
  const uintptr_t x = as_ptr(fn, "x", x_), smooth = as_ptr(fn, "smooth", smooth_),
                  lora_down = as_ptr(fn, "lora_down", lora_down_), y = as_ptr(fn, "y", y_);
  check_size(fn, "M", M);
  check_threads(fn, num_threads);
  check_product(fn, "M", M, "K", K);
  check_product(fn, "M", M, "N", N);
  check_product(fn, "M", M, "R", R);
  check_product(fn, "K", K, "R", R);
  check_ptr(fn, "x", x, M * K);
  check_ptr(fn, "smooth", smooth, M > 0 ? K : 0);
  check_ptr(fn, "lora_down", lora_down, M > 0 ? K * R : 0);
  check_ptr(fn, "y", y, M * N);
  if (M == 0 || N == 0) return;
  const int64_t G = K / svdq::cpu::kGroupSize;
  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  py::gil_scoped_release release;
  // Uninitialised (quantize_act writes every element): a zero-filled vector was one more pass over
  // M·K/2 bytes.
  const std::unique_ptr<uint8_t[]> q_x(new uint8_t[static_cast<size_t>(M * (K / 2))]);
  const std::unique_ptr<float[]> s_x(new float[static_cast<size_t>(M * G)]);
  const std::unique_ptr<float[]> lora_act(new float[static_cast<size_t>(M * R)]);
  (k.quantize_act_linear != nullptr ? k.quantize_act_linear : k.quantize_act)(
      reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(smooth),
      reinterpret_cast<const void*>(lora_down), q_x.get(), s_x.get(), lora_act.get(), M, K, R,
      static_cast<DType>(dtype), static_cast<int>(num_threads));
  a.q_x = q_x.get();
  a.s_x = s_x.get();
  a.lora_act = lora_act.get();
  a.y = reinterpret_cast<void*>(y);
  a.ydtype = static_cast<int>(dtype);
  a.M = M;
  a.num_threads = static_cast<int>(num_threads);
  k.gemm_w4a4(a);
}

// The weight-only (W4A16) linear (reference.linear_w4a16): the path's quantize_act for lora_act (x̂ lora_down;
// its codes are not used) when R > 0 and the kernel does not compute it itself, then the W4A16 kernel. Every
// float tensor is in `dtype`, y [M, N] too.
void linear_w4a16(const py::int_& x_, const py::int_& smooth_, const py::int_& lora_down_, const py::int_& qweight_,
                  const py::int_& wscales_, const py::int_& wmins_, const py::int_& lora_up_, const py::int_& bias_,
                  const py::int_& y_, int64_t M, int64_t N, int64_t K, int64_t R, int64_t dtype,
                  int64_t num_threads, bool tiles, bool bf16, bool gemm) {
  const char* fn = "linear_w4a16";
  if (tiles && svdq::cpu::kernels().linear_w4a16_tiles == nullptr)
    fail(std::string(fn) + ": tiles=True, but the CPU path '" + svdq::cpu::current_isa() +
         "' has no tile kernel (the avx512bf16 and amx paths have)");
  if (bf16 && svdq::cpu::kernels().linear_w4a16_bf16 == nullptr)
    fail(std::string(fn) + ": bf16=True, but the CPU path '" + svdq::cpu::current_isa() +
         "' has no bfloat16 GEMV (every x86 path but generic has)");
  if (gemm && svdq::cpu::kernels().linear_w4a16_bf16_gemm == nullptr)
    fail(std::string(fn) + ": gemm=True, but the CPU path '" + svdq::cpu::current_isa() +
         "' has no fixed-point bfloat16 GEMM (the avxvnni and AVX-512 paths have)");
  if (int(tiles) + int(bf16) + int(gemm) > 1)
    fail(std::string(fn) + ": at most one of tiles=True, bf16=True and gemm=True: choose one kernel");
  const uintptr_t x = as_ptr(fn, "x", x_), smooth = as_ptr(fn, "smooth", smooth_),
                  lora_down = as_ptr(fn, "lora_down", lora_down_), qweight = as_ptr(fn, "qweight", qweight_),
                  wscales = as_ptr(fn, "wscales", wscales_), wmins = as_ptr(fn, "wmins", wmins_),
                  lora_up = as_ptr(fn, "lora_up", lora_up_), bias = as_ptr(fn, "bias", bias_),
                  y = as_ptr(fn, "y", y_);
  check_size(fn, "M", M);
  check_size(fn, "N", N);
  check_size(fn, "K", K);
  check_size(fn, "R", R);
  check_groups(fn, K);
  check_dtype(fn, "dtype", dtype);
  if ((bf16 || gemm) && static_cast<DType>(dtype) != DType::kBFloat16)
    fail(std::string(fn) + (bf16 ? ": bf16=True" : ": gemm=True") +
         " needs every float tensor in bfloat16 (dtype 1), got dtype=" + std::to_string(dtype));
  check_threads(fn, num_threads);
  check_product(fn, "M", M, "K", K);
  check_product(fn, "M", M, "N", N);
  check_product(fn, "M", M, "R", R);
  check_product(fn, "N", N, "K", K);
  check_product(fn, "N", N, "R", R);
  check_product(fn, "K", K, "R", R);
  const bool work = M > 0 && N > 0;  // nothing is read otherwise
  check_ptr(fn, "x", x, work ? M * K : 0);
  check_ptr(fn, "smooth", smooth, work ? K : 0);
  check_ptr(fn, "lora_down", lora_down, work ? K * R : 0);
  check_ptr(fn, "qweight", qweight, work ? N * (K / 2) : 0);
  check_ptr(fn, "wscales", wscales, work ? N * (K / svdq::cpu::kGroupSize) : 0);
  check_ptr(fn, "wmins", wmins, work ? N * (K / svdq::cpu::kGroupSize) : 0);
  check_ptr(fn, "lora_up", lora_up, work ? N * R : 0);
  check_ptr(fn, "y", y, M * N);
  if (!work) return;
  svdq::cpu::W4A16Args a{};
  a.x = reinterpret_cast<const void*>(x);
  a.smooth = reinterpret_cast<const void*>(smooth);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight);
  a.wscales = reinterpret_cast<const void*>(wscales);
  a.wmins = reinterpret_cast<const void*>(wmins);
  a.lora_up = reinterpret_cast<const void*>(lora_up);
  a.bias = reinterpret_cast<const void*>(bias);  // null: no bias
  a.y = reinterpret_cast<void*>(y);
  a.dtype = static_cast<int>(dtype);
  a.M = M;
  a.N = N;
  a.K = K;
  a.R = R;
  a.num_threads = static_cast<int>(num_threads);
  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  py::gil_scoped_release release;
  std::unique_ptr<float[]> lora_act;
  a.lora_down = reinterpret_cast<const void*>(lora_down);
  if (R > 0 && !bf16 && (tiles || gemm || !k.linear_w4a16_lora)) {
    const std::unique_ptr<uint8_t[]> q_x(new uint8_t[static_cast<size_t>(M * (K / 2))]);
    const std::unique_ptr<float[]> s_x(new float[static_cast<size_t>(M * (K / svdq::cpu::kGroupSize))]);
    lora_act.reset(new float[static_cast<size_t>(M * R)]);
    k.quantize_act(a.x, a.smooth, reinterpret_cast<const void*>(lora_down), q_x.get(), s_x.get(), lora_act.get(), M,
                   K, R, static_cast<DType>(dtype), static_cast<int>(num_threads));
  }
  a.lora_act = lora_act.get();
  (tiles ? k.linear_w4a16_tiles : bf16 ? k.linear_w4a16_bf16 : gemm ? k.linear_w4a16_bf16_gemm : k.linear_w4a16)(a);
}

// Rows [0, N) of a W4A16 layer's weight over the smoothing, out[n * ldo + k] = (q s + m) / smooth[k] (smooth 0:
// none), in odtype; the weights in wdtype.
void dequantize_w4a16(const py::int_& qweight_, const py::int_& wscales_, const py::int_& wmins_,
                      const py::int_& smooth_, const py::int_& out_, int64_t N, int64_t K, int64_t ldo,
                      int64_t wdtype, int64_t odtype, int64_t num_threads) {
  const char* fn = "dequantize_w4a16";
  const uintptr_t qweight = as_ptr(fn, "qweight", qweight_), wscales = as_ptr(fn, "wscales", wscales_),
                  wmins = as_ptr(fn, "wmins", wmins_), smooth = as_ptr(fn, "smooth", smooth_),
                  out = as_ptr(fn, "out", out_);
  check_size(fn, "N", N);
  check_size(fn, "K", K);
  check_groups(fn, K);
  check_dtype(fn, "wdtype", wdtype);
  check_dtype(fn, "odtype", odtype);
  check_threads(fn, num_threads);
  if (ldo < K) fail(std::string(fn) + ": ldo must be >= K, got ldo=" + std::to_string(ldo) + ", K=" + std::to_string(K));
  check_product(fn, "N", N, "ldo", ldo);
  check_ptr(fn, "qweight", qweight, N * (K / 2));
  check_ptr(fn, "wscales", wscales, N * (K / svdq::cpu::kGroupSize));
  check_ptr(fn, "wmins", wmins, N * (K / svdq::cpu::kGroupSize));
  check_ptr(fn, "out", out, N * K);
  if (N == 0 || K == 0) return;
  svdq::cpu::DequantW4A16Args a{};
  a.qweight = reinterpret_cast<const uint8_t*>(qweight);
  a.wscales = reinterpret_cast<const void*>(wscales);
  a.wmins = reinterpret_cast<const void*>(wmins);
  a.smooth = reinterpret_cast<const void*>(smooth);  // null: no smoothing factor
  a.out = reinterpret_cast<void*>(out);
  a.wdtype = static_cast<int>(wdtype);
  a.odtype = static_cast<int>(odtype);
  a.N = N;
  a.K = K;
  a.ldo = ldo;
  a.num_threads = static_cast<int>(num_threads);
  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  py::gil_scoped_release release;
  k.dequantize_w4a16(a);
}

// The kernel's tile layout of canonical weights, as the selected path builds it (for tests against
// ops.pack_gemm_weights): wp uint8 [T, K/64 * (1024 + 32)] holding each tile's codes then its
// int16 sums; fl float32 [T, (K/64 + R + 1) * 16] holding each tile's scales, lora_up and bias.
void pack_gemm_tiles(const py::int_& qweight_, const py::int_& wscales_, const py::int_& lora_up_,
                     const py::int_& bias_, const py::int_& wp_, const py::int_& fl_, int64_t N, int64_t K,
                     int64_t R, int64_t wdtype) {
  const char* fn = "pack_gemm_tiles";
  const svdq::cpu::GemmArgs a = weight_args(fn, qweight_, wscales_, lora_up_, bias_, N, K, R, wdtype);
  const uintptr_t wp = as_ptr(fn, "wp", wp_), fl = as_ptr(fn, "fl", fl_);
  const int64_t T = (N + svdq::cpu::kTileN - 1) / svdq::cpu::kTileN, G = K / svdq::cpu::kGroupSize;
  const int64_t bytes = G * (svdq::cpu::kTileBytes + svdq::cpu::kTileSumBytes);
  const int64_t floats = (G + R + 1) * svdq::cpu::kTileN;
  check_ptr(fn, "wp", wp, T * bytes);
  check_ptr(fn, "fl", fl, T * floats);
  const svdq::cpu::KernelTable& k = svdq::cpu::kernels();
  for (int64_t t = 0; t < T; ++t)
    k.pack_tile(a, t,
                svdq::cpu::tile_at(reinterpret_cast<uint8_t*>(wp) + t * bytes,
                                   reinterpret_cast<float*>(fl) + t * floats, G, R));
}

// GOP/s of one run of a peak loop (it returns the ops it did; the timing lives here, outside the
// ISA-flagged files).
using PeakLoop = double (*)(int num_threads, int64_t iters);

// The int8 loop the selected GEMM path is built on (the VNNI and i8mm paths' own instruction), else the widest
// baseline one this CPU runs (dotprod, avx2), else null.
PeakLoop peak_loop() {
  [[maybe_unused]] const std::string current = svdq::cpu::current_isa();
  [[maybe_unused]] auto runs = [](const char* name) {
    for (const auto& s : svdq::cpu::supported_isas())
      if (s == name) return true;
    return false;
  };
#if defined(SVDQ_HAVE_AVXVNNI)
  if (current == "avxvnni") return svdq::cpu::avxvnni::int8_peak_ops;
#endif
#if defined(SVDQ_HAVE_AVX512VNNI)
  if (current == "avx512vnni" || current == "avx512bf16" || current == "amx")  // one main loop
    return svdq::cpu::avx512vnni::int8_peak_ops;
#endif
#if defined(SVDQ_HAVE_I8MM)
  if (current == "i8mm") return svdq::cpu::i8mm::int8_peak_ops;
#endif
#if defined(SVDQ_HAVE_DOTPROD)
  if (runs("dotprod")) return svdq::cpu::dotprod::int8_peak_ops;
#endif
#if defined(SVDQ_HAVE_AVX2)
  if (runs("avx2")) return svdq::cpu::avx2::int8_peak_ops;
#endif
  return nullptr;
}

double gops_of(PeakLoop loop, int num_threads, int64_t iters) {
  const auto start = std::chrono::steady_clock::now();
  const double ops = loop(num_threads, iters);
  return ops / std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() / 1e9;
}

void set_cpu_isa(const std::string& name) {
  if (svdq::cpu::set_isa(name)) return;
  const auto supported = svdq::cpu::supported_isas();
  const auto known = svdq::cpu::known_isas();
  bool is_known = false;
  for (const auto& k : known) is_known |= k == name;
  if (is_known)
    fail("set_cpu_isa: CPU path '" + name +
         "' is not supported by this CPU/OS; supported: " + join(supported));
  fail("set_cpu_isa: unknown CPU path '" + name + "'; supported on this CPU: " + join(supported) +
       " (built: " + join(known) + ")");
}

}  // namespace

void add_cpu(py::module_& m) {
  m.def("quantize_act", &quantize_act, py::arg("x"), py::arg("smooth"), py::arg("lora_down"), py::arg("q_x"),
        py::arg("s_x"), py::arg("lora_act"), py::arg("M"), py::arg("K"), py::arg("R"), py::arg("dtype"),
        py::arg("group_size"), py::arg("num_threads"),
        R"doc(Smooth, INT4-quantize per 64-group and down-project activations (reference.quantize_act).

x [M, K], smooth [K], lora_down [K, R]: all `dtype` (0 float32, 1 bfloat16, 2 float16), contiguous.
Writes q_x uint8 [M, K/2] (element 2j low nibble), s_x float32 [M, K/64], lora_act float32 [M, R].
Pointers are ints (tensor.data_ptr()); one may be 0 when its tensor is empty. Releases the GIL.)doc");
  m.def("gemm_w4a4", &gemm_w4a4, py::arg("q_x"), py::arg("s_x"), py::arg("lora_act"), py::arg("qweight"),
        py::arg("wscales"), py::arg("lora_up"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("R"), py::arg("wdtype"), py::arg("ydtype"), py::arg("num_threads"),
        R"doc(W4A4 GEMM + low-rank + bias on the canonical weights (docs/design.md section 2).

q_x uint8 [M, K/2], s_x float32 [M, K/64], lora_act float32 [M, R]; qweight uint8 [N, K/2]; wscales
[N, K/64], lora_up [N, R], bias [N] (or 0) in wdtype (0 float32, 1 bfloat16, 2 float16); writes y
[M, N] in ydtype (same codes; computed in float32, rounded to nearest even once). The kernel builds its tile layout itself (cpp/cpu/gemm_layout.h). Releases the GIL.)doc");
  m.def("linear", &linear, py::arg("x"), py::arg("smooth"), py::arg("lora_down"), py::arg("qweight"),
        py::arg("wscales"), py::arg("lora_up"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("R"), py::arg("dtype"), py::arg("num_threads"),
        R"doc(A whole SVDQuant linear: quantize_act then gemm_w4a4 without leaving native code.

x [M, K], smooth [K], lora_down [K, R] and the canonical weights all in dtype; writes y [M, N] in dtype
(computed in float32, rounded to nearest even once).
Releases the GIL.)doc");
  m.def("linear_w4a16", &linear_w4a16, py::arg("x"), py::arg("smooth"), py::arg("lora_down"), py::arg("qweight"),
        py::arg("wscales"), py::arg("wmins"), py::arg("lora_up"), py::arg("bias"), py::arg("y"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("R"), py::arg("dtype"), py::arg("num_threads"), py::arg("tiles") = false,
        py::arg("bf16") = false, py::arg("gemm") = false,
        R"doc(The weight-only INT4 linear (reference.linear_w4a16).

x [M, K], smooth [K], lora_down [K, R]; qweight uint8 [N, K/2] unsigned codes (element 2j low nibble);
wscales, wmins [N, K/64]; lora_up [N, R]; bias [N] (or 0): every float tensor in dtype (0 float32,
1 bfloat16, 2 float16), contiguous. Writes y [M, N] in dtype (float32 arithmetic, rounded once).
tiles=False: the few-rows kernel; tiles=True: the tile kernel (AMX-BF16 or zmm vdpbf16ps;
w4a16_tiles_available()), whose operands x / smooth, W, lora_act and lora_up are rounded to bfloat16 first;
bf16=True (dtype 1 only): the few-rows kernel with x / smooth in 16-bit fixed point per group of 64
(reference.quantize_fixed16; w4a16_bf16_gemv_available()); gemm=True (dtype 1 only): the many-rows kernel in
the same fixed point (w4a16_bf16_gemm_available()). Releases the GIL.)doc");
  m.def(
      "w4a16_bf16_gemm_available", [] { return svdq::cpu::kernels().linear_w4a16_bf16_gemm != nullptr; },
      "Whether the selected CPU path has the many-rows fixed-point bfloat16 W4A16 GEMM (linear_w4a16(..., "
      "gemm=True)): avxvnni (ymm) and the AVX-512 paths (zmm).");
  m.def(
      "w4a16_bf16_gemv_available", [] { return svdq::cpu::kernels().linear_w4a16_bf16 != nullptr; },
      "Whether the selected CPU path has the bfloat16 W4A16 GEMV (linear_w4a16(..., bf16=True)): every x86 path "
      "but generic (ymm on avx2 and avxvnni, zmm on the AVX-512 ones).");
  m.def(
      "w4a16_tiles_available", [] { return svdq::cpu::kernels().linear_w4a16_tiles != nullptr; },
      "Whether the selected CPU path has the W4A16 tile kernel (linear_w4a16(..., tiles=True)): the avx512bf16 "
      "(zmm vdpbf16ps) and amx (AMX-BF16) paths.");
  m.def("dequantize_w4a16", &dequantize_w4a16, py::arg("qweight"), py::arg("wscales"), py::arg("wmins"),
        py::arg("smooth"), py::arg("out"), py::arg("N"), py::arg("K"), py::arg("ldo"), py::arg("wdtype"),
        py::arg("odtype"), py::arg("num_threads"),
        R"doc(A W4A16 weight over the smoothing: out[n, k] = (q[n, k] s[n, g] + m[n, g]) * (1 / smooth[k]).

qweight uint8 [N, K/2]; wscales, wmins [N, K/64] and smooth [K] (0: no smoothing) in wdtype; writes out
[N, K] in odtype, rows ldo >= K elements apart (float32 arithmetic, rounded once). Releases the GIL.)doc");
  m.def("pack_gemm_tiles", &pack_gemm_tiles, py::arg("qweight"), py::arg("wscales"), py::arg("lora_up"),
        py::arg("bias"), py::arg("wp"), py::arg("fl"), py::arg("N"), py::arg("K"), py::arg("R"),
        py::arg("wdtype"),
        "The selected path's tile layout of canonical weights: wp uint8 [T, K/64 * 1056] (codes, then "
        "int16 sums), fl float32 "
        "[T, (K/64 + R + 1) * 16] (scales, lora_up, bias per tile). For tests.");
  m.def(
      "int8_peak_gops",
      [](int num_threads, int64_t iters) -> double {
        if (num_threads < 1)
          fail("int8_peak_gops: num_threads must be >= 1, got " + std::to_string(num_threads));
        if (iters < 1) fail("int8_peak_gops: iters must be >= 1, got " + std::to_string(iters));
        const PeakLoop loop = peak_loop();
        if (loop == nullptr) fail("int8_peak_gops: needs the avx2 or dotprod path, which this CPU or build lacks");
        py::gil_scoped_release release;
        return gops_of(loop, num_threads, iters);
      },
      py::arg("num_threads"), py::arg("iters") = 10000000,
      "GOP/s (2 ops per int8 product) on num_threads threads of a tight loop of the selected path's\n"
      "int8 instruction: vpdpbusd on the VNNI paths, vpmaddubsw+vpmaddwd otherwise (avx2 or generic);\n"
      "on Arm smmla on the i8mm path, sdot otherwise (dotprod or generic).");
  m.def(
      "first_nonfinite",
      [](const std::vector<int64_t>& data, const std::vector<int64_t>& numel, const std::vector<int64_t>& dtypes,
         int64_t num_threads) -> int64_t {
        const char* fn = "first_nonfinite";
        if (data.size() != numel.size() || data.size() != dtypes.size())
          fail("first_nonfinite: data, numel and dtypes must have the same length");
        check_threads(fn, num_threads);
        std::vector<const void*> ptrs(data.size());
        std::vector<DType> codes(data.size());
        for (size_t b = 0; b < data.size(); ++b) {
          check_size(fn, "numel", numel[b]);
          check_ptr(fn, "data", static_cast<uintptr_t>(data[b]), numel[b]);
          check_dtype(fn, "dtypes", dtypes[b]);
          ptrs[b] = reinterpret_cast<const void*>(data[b]);
          codes[b] = static_cast<DType>(dtypes[b]);
        }
        py::gil_scoped_release release;
        return svdq::cpu::first_nonfinite(ptrs, numel, codes, static_cast<int>(num_threads));
      },
      py::arg("data"), py::arg("numel"), py::arg("dtypes"), py::arg("num_threads"),
      "Index of the first contiguous buffer (data_ptr, numel, dtype code) holding NaN or +-inf, or -1.");
  m.def(
      "fixed_point_add",
      [](const py::int_& ints_, const py::int_& item_, const py::int_& exponents_, int64_t K, int64_t offset,
         int64_t num_threads) -> bool {
        const char* fn = "fixed_point_add";
        const uintptr_t ints = as_ptr(fn, "ints", ints_), item = as_ptr(fn, "item", item_),
                        exponents = as_ptr(fn, "exponents", exponents_);
        check_fixed_point(fn, K, offset, ints, item, exponents);
        check_threads(fn, num_threads);
        py::gil_scoped_release release;
        return svdq::cpu::fixed_point_add(reinterpret_cast<int64_t*>(ints), reinterpret_cast<const float*>(item),
                                          reinterpret_cast<const int64_t*>(exponents), K, offset,
                                          static_cast<int>(num_threads));
      },
      py::arg("ints"), py::arg("item"), py::arg("exponents"), py::arg("K"), py::arg("offset"),
      py::arg("num_threads"),
      "reference.fixed_point_add: ints (int64) += the packed float32 item in units 2^(s_j + s_l + offset), in place;\n"
      "whether every unit and every diagonal stayed below 2^62. exponents: int64 [K], within +-512.");
  py::class_<svdq::cpu::FiniteScanner>(
      m, "FiniteScanner",
      "first_nonfinite's test of byte ranges of a file, read and tested on one background thread started by the\n"
      "constructor; finish() waits for it.")
      .def(py::init([](const std::string& path, const std::vector<int64_t>& offsets, const std::vector<int64_t>& numel,
                       const std::vector<int64_t>& dtypes) {
             std::vector<DType> codes(dtypes.size());
             for (size_t b = 0; b < dtypes.size(); ++b) {
               check_dtype("FiniteScanner", "dtypes", dtypes[b]);
               codes[b] = static_cast<DType>(dtypes[b]);
             }
             // Ranges are checked against the file's size in C++, not per range in Python: the loader passes
             // every tensor of a checkpoint.
             return std::make_unique<svdq::cpu::FiniteScanner>(path, offsets, numel, std::move(codes));
           }),
           py::arg("path"), py::arg("offsets"), py::arg("numel"), py::arg("dtypes"),
           "Start scanning ranges (byte offset, numel, dtype code) of the file at path for NaN or +-inf;\n"
           "ValueError naming the file or the range if it cannot be opened or a range is not in it.")
      .def("finish", &svdq::cpu::FiniteScanner::finish, py::call_guard<py::gil_scoped_release>(),
           "Wait for the scan; the indices of the ranges holding NaN or +-inf, ascending. RuntimeError naming the\n"
           "file if it could not be read.");
  m.def(
      "cpu_isa", [] { return std::string(svdq::cpu::current_isa()); },
      "The CPU instruction path in use: 'generic', 'avx2', ... (Arm: 'dotprod', 'i8mm').");
  m.def("supported_cpu_isas", &svdq::cpu::supported_isas,
        "CPU paths this CPU and OS can run (cpuid and XCR0), 'generic' first, best last.");
  m.def("known_cpu_isas", &svdq::cpu::known_isas,
        "CPU paths compiled into this build, whether or not this CPU can run them.");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Select a CPU path process-wide; ValueError if unknown or unsupported here.");
}

}  // namespace svdq::bindings
