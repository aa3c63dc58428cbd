// reference.fixed_point_add on a GPU: calibration's exact fixed-point XᵀX sum, one thread per packed entry. The
// item's float64 product with 2^shift is exact, __double2ll_rn rounds it to nearest, ties to even (torch.round),
// so the integers are the reference's bit for bit. Memory-bound: 4 bytes of item and 8 of sum read, 8 written per
// entry, where the torch chain of the reference (float64 temporaries, shifts, checks) moves about 100.

#include "common.cuh"
#include "cpu/fixedpoint.h"  // packed_row_start: the indexing the CPU kernel's tests check

namespace svdq::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxGridRows = 65535;
constexpr double kLimit = 4611686018427387904.0;  // 2^62
constexpr long long kLimitInt = 1LL << 62;

__global__ void fixed_point_add_kernel(long long* ints, const float* item, const long long* exponents, long long K,
                                       long long offset, int* ok) {
  for (long long j = blockIdx.y; j < K; j += gridDim.y) {
    const long long r0 = j / svdq::cpu::kPackRows * svdq::cpu::kPackRows, start = svdq::cpu::packed_row_start(j, K);
    const long long row_shift = -offset - exponents[j];
    for (long long c = r0 + static_cast<long long>(blockIdx.x) * kThreads + threadIdx.x; c < K;
         c += static_cast<long long>(gridDim.x) * kThreads) {
      const long long e = start + (c - r0);
      const int shift = static_cast<int>(row_shift - exponents[c]);  // within ±1536: the caller bounds them
      const double d = static_cast<double>(item[e]) * scalbn(1.0, shift);
      if (fabs(d) >= kLimit) *ok = 0;
      const unsigned long long sum =
          static_cast<unsigned long long>(ints[e]) + static_cast<unsigned long long>(__double2ll_rn(d));
      ints[e] = static_cast<long long>(sum);  // unsigned: a unit past 2^63 (already failed) wraps
      if (c == j && static_cast<long long>(sum) >= kLimitInt) *ok = 0;
    }
  }
}

}  // namespace

std::string fixed_point_add(int64_t* ints, const float* item, const int64_t* exponents, int64_t K, int64_t offset,
                            int* ok, int device, uintptr_t stream) {
  if (K <= 0) return "";
  int cc = 0;
  std::string err = use_device(device, &cc);
  if (!err.empty()) return "fixed_point_add (CUDA): " + err;
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>((K + kThreads - 1) / kThreads),
                  static_cast<unsigned>(K < kMaxGridRows ? K : kMaxGridRows));
  fixed_point_add_kernel<<<grid, kThreads, 0, s>>>(reinterpret_cast<long long*>(ints), item,
                                                   reinterpret_cast<const long long*>(exponents), K, offset, ok);
  const cudaError_t e = finish_launch(s);
  if (e != cudaSuccess) return cuda_error("fixed_point_add (CUDA) kernel", e);
  return "";
}

}  // namespace svdq::cuda
