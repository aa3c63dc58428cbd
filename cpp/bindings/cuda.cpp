// The CUDA entry points of _C (built with the CUDA kernels only): the same validation as the CPU entry points
// (common.h), plus the device index and the stream (an integer cudaStream_t). CUDA failures come back as
// strings and are raised as RuntimeError here.

#include "bindings/common.h"

#if defined(SVDQ_HAVE_CUDA_KERNELS)
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cpu/kernels.h"
#include "cuda/kernels.h"

static_assert(svdq::cuda::kGroupSize == svdq::cpu::kGroupSize, "one INT4 group size (_C.GROUP_SIZE)");
#endif

namespace svdq::bindings {

#if defined(SVDQ_HAVE_CUDA_KERNELS)
namespace {

void check_cuda(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}

void check_device(const char* fn, int64_t device) {
  if (device < 0 || device > 1024)
    fail(std::string(fn) + ": device must be a CUDA device index, got " + std::to_string(device));
}

void check_aligned(const char* fn, const char* name, uintptr_t p) {
  if (p % 16 != 0) fail(std::string(fn) + ": " + name + " must be 16-byte aligned");
}

void cuda_quantize_act(const py::int_& x_, const py::int_& smooth_, const py::int_& lora_down_,
                       const py::int_& q_x_, const py::int_& s_x_, const py::int_& lora_act_, int64_t M,
                       int64_t K, int64_t R, int64_t dtype, int64_t device, const py::int_& stream_) {
  const char* fn = "cuda_quantize_act";
  const uintptr_t x = as_ptr(fn, "x", x_), smooth = as_ptr(fn, "smooth", smooth_),
                  lora_down = as_ptr(fn, "lora_down", lora_down_), q_x = as_ptr(fn, "q_x", q_x_),
                  s_x = as_ptr(fn, "s_x", s_x_), lora_act = as_ptr(fn, "lora_act", lora_act_),
                  stream = as_ptr(fn, "stream", stream_);
  check_size(fn, "M", M);
  check_size(fn, "K", K);
  check_size(fn, "R", R);
  check_groups(fn, K);
  check_dtype(fn, "dtype", dtype);
  check_device(fn, device);
  check_product(fn, "M", M, "K", K);
  check_product(fn, "K", K, "R", R);
  check_product(fn, "M", M, "R", R);
  check_ptr(fn, "x", x, M * K);
  check_ptr(fn, "smooth", smooth, M > 0 ? K : 0);
  check_ptr(fn, "lora_down", lora_down, M > 0 ? K * R : 0);
  check_ptr(fn, "q_x", q_x, M * (K / 2));
  check_ptr(fn, "s_x", s_x, M * (K / 64));
  check_ptr(fn, "lora_act", lora_act, M * R);
  if (M == 0) return;
  check_aligned(fn, "x", x);
  check_aligned(fn, "smooth", smooth);
  check_aligned(fn, "q_x", q_x);
  check_cuda(svdq::cuda::quantize_act(reinterpret_cast<const void*>(x), reinterpret_cast<const void*>(smooth),
                                      reinterpret_cast<const void*>(lora_down),
                                      reinterpret_cast<uint8_t*>(q_x), reinterpret_cast<float*>(s_x),
                                      reinterpret_cast<float*>(lora_act), M, K, R, static_cast<int>(dtype),
                                      static_cast<int>(device), stream));
}

void cuda_gemm_w4a4(const py::int_& q_x_, const py::int_& s_x_, const py::int_& lora_act_,
                    const py::int_& wq_, const py::int_& sw_, const py::int_& lora_up_, const py::int_& bias_,
                    const py::int_& y_, int64_t M, int64_t N, int64_t K, int64_t R, int64_t out_dtype,
                    int64_t mma_path, int64_t device, const py::int_& stream_) {
  const char* fn = "cuda_gemm_w4a4";
  svdq::cuda::GemmArgs a{};
  const uintptr_t q_x = as_ptr(fn, "q_x", q_x_), s_x = as_ptr(fn, "s_x", s_x_),
                  lora_act = as_ptr(fn, "lora_act", lora_act_), wq = as_ptr(fn, "wq", wq_),
                  sw = as_ptr(fn, "sw", sw_), lora_up = as_ptr(fn, "lora_up", lora_up_),
                  bias = as_ptr(fn, "bias", bias_), y = as_ptr(fn, "y", y_),
                  stream = as_ptr(fn, "stream", stream_);
  check_size(fn, "M", M);
  check_size(fn, "N", N);
  check_size(fn, "K", K);
  check_size(fn, "R", R);
  check_groups(fn, K);
  check_dtype(fn, "out_dtype", out_dtype);
  if (mma_path < 0 || mma_path > 2)
    fail(std::string(fn) + ": mma_path must be 0 (auto), 1 (s4) or 2 (s8), got " + std::to_string(mma_path));
  check_device(fn, device);
  const int64_t tile = svdq::cuda::kTileN;
  check_product(fn, "M", M, "K", K);
  check_product(fn, "M", M, "N", N);
  check_product(fn, "N", N + tile, "K", K);
  check_product(fn, "N", N + tile, "R", R);
  const int64_t Np = (N + tile - 1) / tile * tile, G = K / svdq::cuda::kGroupSize;
  const bool work = M > 0 && N > 0;
  check_ptr(fn, "q_x", q_x, M * (K / 2));
  check_ptr(fn, "s_x", s_x, M * G);
  check_ptr(fn, "lora_act", lora_act, M * R);
  check_ptr(fn, "wq", wq, work ? Np * K / 2 : 0);
  check_ptr(fn, "sw", sw, work ? Np * G : 0);
  check_ptr(fn, "lora_up", lora_up, work ? Np * R : 0);
  check_ptr(fn, "y", y, M * N);
  if (!work) return;
  check_aligned(fn, "q_x", q_x);
  check_aligned(fn, "wq", wq);
  check_aligned(fn, "sw", sw);
  a.q_x = reinterpret_cast<const uint8_t*>(q_x);
  a.s_x = reinterpret_cast<const float*>(s_x);
  a.lora_act = reinterpret_cast<const float*>(lora_act);
  a.wq = reinterpret_cast<const uint8_t*>(wq);
  a.sw = reinterpret_cast<const float*>(sw);
  a.lora_up = reinterpret_cast<const float*>(lora_up);
  a.bias = reinterpret_cast<const float*>(bias);  // null: no bias
  a.y = reinterpret_cast<void*>(y);
  a.M = M;
  a.N = N;
  a.K = K;
  a.R = R;
  a.out_dtype = static_cast<int>(out_dtype);
  check_cuda(
      svdq::cuda::gemm_w4a4(a, static_cast<svdq::cuda::MmaPath>(mma_path), static_cast<int>(device), stream));
}

// W4A16: the plan (workspace size and kernel choice) is a pure function of the sizes and the SM count.
svdq::cuda::W4A16Plan w4a16_plan(const char* fn, int64_t M, int64_t N, int64_t K, int64_t R, int64_t path,
                                 int64_t sms) {
  check_size(fn, "M", M);
  check_size(fn, "N", N);
  check_size(fn, "R", R);
  if (K <= 0 || K % svdq::cuda::kGroupSize != 0)
    fail(std::string(fn) + ": K must be a positive multiple of 64, got K=" + std::to_string(K));
  if (path < 0 || path > 2)
    fail(std::string(fn) + ": path must be 0 (auto), 1 (gemv) or 2 (gemm), got " + std::to_string(path));
  if (sms < 1 || sms > 65536) fail(std::string(fn) + ": sms must be in [1, 65536], got " + std::to_string(sms));
  check_product(fn, "M", M, "K", K);
  check_product(fn, "N", N, "K", K);
  check_product(fn, "M", M, "N", N);
  check_product(fn, "K", K, "R", R);
  check_product(fn, "N", N, "R", R);
  svdq::cuda::W4A16Plan plan;
  const std::string err = svdq::cuda::plan_w4a16(M, N, K, R, static_cast<svdq::cuda::W4A16Path>(path),
                                                 static_cast<int>(sms), &plan);
  if (!err.empty()) fail(err);
  return plan;
}

py::dict cuda_w4a16_plan(int64_t M, int64_t N, int64_t K, int64_t R, int64_t path, int64_t sms) {
  const svdq::cuda::W4A16Plan p = w4a16_plan("cuda_w4a16_plan", M, N, K, R, path, sms);
  py::dict d;
  d["kernel"] = p.gemv ? "gemv" : "gemm";
  d["gemv_rows"] = p.gemv_rows, d["gemv_ksplit"] = p.gemv_ksplit, d["gemv_kslice"] = p.gemv_kslice;
  d["gemm_bm"] = p.gemm_bm, d["pro_rows"] = p.pro_rows, d["pro_kslices"] = p.pro_kslices;
  d["pro_kslice"] = p.pro_kslice, d["counters"] = p.counters, d["pro_counters"] = p.pro_counters;
  d["lora_act_off"] = p.lora_act_off, d["lora_part_off"] = p.lora_part_off, d["xhat_off"] = p.xhat_off;
  d["xsum_off"] = p.xsum_off, d["partial_off"] = p.partial_off, d["inv_smooth_off"] = p.inv_smooth_off;
  d["bytes"] = p.bytes;
  return d;
}

void cuda_linear_w4a16(const py::int_& x_, const py::int_& qweight_, const py::int_& wscales_,
                       const py::int_& wmins_, const py::int_& smooth_, const py::int_& lora_down_,
                       const py::int_& lora_up_, const py::int_& bias_, const py::int_& y_,
                       const py::int_& workspace_, int64_t workspace_bytes, int64_t M, int64_t N, int64_t K,
                       int64_t R, int64_t dtype, int64_t path, int64_t sms, int64_t device,
                       const py::int_& stream_) {
  const char* fn = "cuda_linear_w4a16";
  const uintptr_t x = as_ptr(fn, "x", x_), qweight = as_ptr(fn, "qweight", qweight_),
                  wscales = as_ptr(fn, "wscales", wscales_), wmins = as_ptr(fn, "wmins", wmins_),
                  smooth = as_ptr(fn, "smooth", smooth_), lora_down = as_ptr(fn, "lora_down", lora_down_),
                  lora_up = as_ptr(fn, "lora_up", lora_up_), bias = as_ptr(fn, "bias", bias_),
                  y = as_ptr(fn, "y", y_), workspace = as_ptr(fn, "workspace", workspace_),
                  stream = as_ptr(fn, "stream", stream_);
  if (dtype != 1 && dtype != 2)
    fail(std::string(fn) + ": dtype must be 1 (bfloat16) or 2 (float16), got " + std::to_string(dtype));
  check_device(fn, device);
  const svdq::cuda::W4A16Plan plan = w4a16_plan(fn, M, N, K, R, path, sms);
  const bool work = M > 0 && N > 0;
  const int64_t G = K / svdq::cuda::kGroupSize;
  check_ptr(fn, "x", x, M * K);
  check_ptr(fn, "qweight", qweight, work ? N * (K / 2) : 0);
  check_ptr(fn, "wscales", wscales, work ? N * G : 0);
  check_ptr(fn, "wmins", wmins, work ? N * G : 0);
  check_ptr(fn, "smooth", smooth, work ? K : 0);
  check_ptr(fn, "lora_down", lora_down, work ? K * R : 0);
  check_ptr(fn, "lora_up", lora_up, work ? N * R : 0);
  check_ptr(fn, "y", y, M * N);
  check_ptr(fn, "workspace", workspace, plan.bytes);
  if (workspace_bytes < plan.bytes)
    fail(std::string(fn) + ": workspace has " + std::to_string(workspace_bytes) + " bytes, these sizes need " +
         std::to_string(plan.bytes) + " (cuda_w4a16_plan)");
  if (!work) return;
  check_aligned(fn, "x", x);
  check_aligned(fn, "qweight", qweight);
  check_aligned(fn, "smooth", smooth);
  check_aligned(fn, "workspace", workspace);
  svdq::cuda::W4A16Args a{};
  a.x = reinterpret_cast<const void*>(x);
  a.qweight = reinterpret_cast<const uint8_t*>(qweight);
  a.wscales = reinterpret_cast<const void*>(wscales);
  a.wmins = reinterpret_cast<const void*>(wmins);
  a.smooth = reinterpret_cast<const void*>(smooth);
  a.lora_down = reinterpret_cast<const void*>(lora_down);
  a.lora_up = reinterpret_cast<const void*>(lora_up);
  a.bias = reinterpret_cast<const void*>(bias);  // null: no bias
  a.y = reinterpret_cast<void*>(y);
  a.workspace = reinterpret_cast<void*>(workspace);
  a.M = M, a.N = N, a.K = K, a.R = R;
  a.dtype = static_cast<int>(dtype);
  check_cuda(svdq::cuda::linear_w4a16(a, static_cast<svdq::cuda::W4A16Path>(path), static_cast<int>(sms),
                                      static_cast<int>(device), stream));
}

void cuda_fixed_point_add(const py::int_& ints_, const py::int_& item_, const py::int_& exponents_,
                          const py::int_& ok_, int64_t K, int64_t offset, int64_t device, const py::int_& stream_) {
  const char* fn = "cuda_fixed_point_add";
  const uintptr_t ints = as_ptr(fn, "ints", ints_), item = as_ptr(fn, "item", item_),
                  exponents = as_ptr(fn, "exponents", exponents_), ok = as_ptr(fn, "ok", ok_),
                  stream = as_ptr(fn, "stream", stream_);
  check_fixed_point(fn, K, offset, ints, item, exponents);
  check_device(fn, device);
  check_ptr(fn, "ok", ok, 1);
  check_cuda(svdq::cuda::fixed_point_add(reinterpret_cast<int64_t*>(ints), reinterpret_cast<const float*>(item),
                                         reinterpret_cast<const int64_t*>(exponents), K, offset,
                                         reinterpret_cast<int*>(ok), static_cast<int>(device), stream));
}

std::string cuda_mma_path(int64_t device) {
  check_device("cuda_mma_path", device);
  int cc = 0;
  check_cuda(svdq::cuda::device_capability(static_cast<int>(device), &cc));
  return svdq::cuda::auto_mma_path(cc);
}

}  // namespace
#endif  // SVDQ_HAVE_CUDA_KERNELS

void add_cuda([[maybe_unused]] py::module_& m) {
#if defined(SVDQ_HAVE_CUDA_KERNELS)
  m.def("cuda_quantize_act", &cuda_quantize_act, py::arg("x"), py::arg("smooth"), py::arg("lora_down"),
        py::arg("q_x"), py::arg("s_x"), py::arg("lora_act"), py::arg("M"), py::arg("K"), py::arg("R"),
        py::arg("dtype"), py::arg("device"), py::arg("stream"),
        R"doc(quantize_act on CUDA device pointers (same layouts as quantize_act), launched on `stream`.

x, smooth, q_x 16-byte aligned. RuntimeError with the CUDA error when the device cannot run it.)doc");
  m.def("cuda_gemm_w4a4", &cuda_gemm_w4a4, py::arg("q_x"), py::arg("s_x"), py::arg("lora_act"), py::arg("wq"),
        py::arg("sw"), py::arg("lora_up"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"),
        py::arg("K"), py::arg("R"), py::arg("out_dtype"), py::arg("mma_path"), py::arg("device"),
        py::arg("stream"),
        R"doc(W4A4 GEMM + low-rank + bias on CUDA, weights in the mma layout (ops.pack_mma_weights).

q_x uint8 [M, K/2], s_x float32 [M, K/64], lora_act float32 [M, R]; wq uint8 [Np/64, K/64, 2048],
sw float32 [K/64, Np], lora_up float32 [R, Np], bias float32 [Np] or 0 (Np = N rounded up to 128);
writes y [M, N] in out_dtype (0 float32, 1 bfloat16, 2 float16). mma_path: 0 auto, 1 s4 (sm_8x), 2 s8.)doc");
  m.def("cuda_w4a16_plan", &cuda_w4a16_plan, py::arg("M"), py::arg("N"), py::arg("K"), py::arg("R"),
        py::arg("path"), py::arg("sms"),
        "How cuda_linear_w4a16 runs these sizes on a GPU with `sms` multiprocessors: kernel ('gemv' / 'gemm'), "
        "split-K and tile choices, workspace offsets and 'bytes' (the workspace size). path: 0 auto, 1 gemv, "
        "2 gemm. No GPU needed.");
  m.def("cuda_linear_w4a16", &cuda_linear_w4a16, py::arg("x"), py::arg("qweight"), py::arg("wscales"),
        py::arg("wmins"), py::arg("smooth"), py::arg("lora_down"), py::arg("lora_up"), py::arg("bias"), py::arg("y"),
        py::arg("workspace"), py::arg("workspace_bytes"), py::arg("M"), py::arg("N"), py::arg("K"), py::arg("R"),
        py::arg("dtype"), py::arg("path"), py::arg("sms"), py::arg("device"), py::arg("stream"),
        R"doc(Weight-only W4A16 linear on CUDA (reference.linear_w4a16), launched on `stream`.

x [M, K]; qweight uint8 [N, K/2] unsigned codes; wscales, wmins [N, K/64]; smooth [K]; lora_down [K, R];
lora_up [N, R]; bias [N] or 0; y [M, N]: all floats in `dtype` (1 bfloat16, 2 float16), contiguous.
workspace: cuda_w4a16_plan(...)['bytes'] bytes. x, qweight, smooth, workspace 16-byte aligned. path: 0 auto
(GEMV up to 16 rows, mma GEMM above), 1 gemv, 2 gemm. sms: the device's multiprocessor count.)doc");
  m.def("cuda_fixed_point_add", &cuda_fixed_point_add, py::arg("ints"), py::arg("item"), py::arg("exponents"),
        py::arg("ok"), py::arg("K"), py::arg("offset"), py::arg("device"), py::arg("stream"),
        "reference.fixed_point_add on CUDA device pointers, launched on `stream`: ints int64 += the packed float32 "
        "item in units 2^(s_j + s_l + offset) (exponents int64 [K], within +-512); sets the int32 *ok to 0 when a "
        "unit or a diagonal reached 2^62.");
  m.def("cuda_mma_path", &cuda_mma_path, py::arg("device"),
        "The GEMM path auto-selected on a CUDA device: 's4' (sm_8x), 's8' (sm_90+), '' (cannot run); "
        "RuntimeError without a usable device.");
#endif
}

}  // namespace svdq::bindings
