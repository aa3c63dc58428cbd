// reference.fixed_point_add on the CPU: one pass over the float32 item and the int64 sum (12 bytes read, 8 written
// per entry), rows shared out over the threads. The float64 product item · 2^shift is exact (a power of two, the
// shifts bounded by the caller), and one conversion to int64 in the default rounding mode (to nearest, ties to
// even: what torch.round does) rounds it: the integers are the reference's bit for bit.

#include "fixedpoint.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#endif

namespace svdq::cpu {
namespace {

constexpr double kLimit = 4611686018427387904.0;  // 2^62
constexpr int64_t kLimitInt = int64_t{1} << 62;

// round(d) as int64, ties to even, for |d| < 2^63. x86-64: cvtsd2si in the default MXCSR mode (baseline SSE2,
// where std::llrint may be a libm call).
inline int64_t round_to_int(double d) {
#if defined(__x86_64__) || defined(_M_X64)
  return _mm_cvtsd_si64(_mm_set_sd(d));
#else
  return std::llrint(d);
#endif
}

// An exponent for std::ldexp: the caller keeps them within ±512; clamped so that none is undefined.
inline int shift_of(int64_t e) { return static_cast<int>(std::clamp<int64_t>(e, -4096, 4096)); }

}  // namespace

int64_t packed_size(int64_t K) {
  return K > 0 ? packed_row_start(K - 1, K) + (K - (K - 1) / kPackRows * kPackRows) : 0;  // the last row's end
}

bool fixed_point_add(int64_t* ints, const float* item, const int64_t* exponents, int64_t K, int64_t offset,
                     int num_threads) {
  std::vector<double> col(static_cast<size_t>(K));  // 2^−s_l
  for (int64_t l = 0; l < K; ++l) col[l] = std::ldexp(1.0, shift_of(-exponents[l]));
  int ok = 1;
  const int nt = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(num_threads, K)));
#pragma omp parallel for num_threads(nt) schedule(dynamic, 8) reduction(& : ok) if (nt > 1)
  for (int64_t j = 0; j < K; ++j) {
    const int64_t r0 = j / kPackRows * kPackRows, width = K - r0, start = packed_row_start(j, K);
    int64_t* acc = ints + start;
    const float* v = item + start;
    const double* c = col.data() + r0;
    const double row = std::ldexp(1.0, shift_of(-offset - exponents[j]));  // 2^−(s_j + o)
    double top = 0.0;  // the largest |units| of the row
    for (int64_t i = 0; i < width; ++i) {
      // row · c[i] = 2^shift exactly (|shift| < 1024); times the item, exact: one product, as the reference's.
      const double d = static_cast<double>(v[i]) * (row * c[i]);
      top = std::max(top, std::fabs(d));
      // |d| < 2^62 is an integer from 2^52 on: the check on d is the check on round(d). Unsigned: a unit past
      // 2^63 (already failed) wraps instead of overflowing.
      acc[i] = static_cast<int64_t>(static_cast<uint64_t>(acc[i]) + static_cast<uint64_t>(round_to_int(d)));
    }
    ok &= static_cast<int>(top < kLimit) & static_cast<int>(acc[j - r0] < kLimitInt);
  }
  return ok != 0;
}

}  // namespace svdq::cpu
