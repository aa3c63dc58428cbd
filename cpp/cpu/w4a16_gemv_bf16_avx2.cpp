// The ymm fixed-point bfloat16 GEMV (w4a16_gemv_fixed_ymm.inc) for the avx2 path: AVX2 + FMA + F16C
// (vpmaddubsw + vpmaddwd).
// Compiled with this path's flags only (CMakeLists.txt).
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

#define SVDQ_YMM_VNNI 0

namespace svdq::cpu::avx2 {
namespace {

#include "w4a16_gemv_fixed_ymm.inc"

}  // namespace svdq::cpu::avx2
