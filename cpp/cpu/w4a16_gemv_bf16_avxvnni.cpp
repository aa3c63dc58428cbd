// The ymm fixed-point bfloat16 GEMV (w4a16_gemv_fixed_ymm.inc) for the avxvnni path: AVX-VNNI (VEX vpdpbusd).
// Compiled with this path's flags only (CMakeLists.txt).
#include <immintrin.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

#define SVDQ_YMM_VNNI 1

namespace svdq::cpu::avxvnni {
namespace {

#include "w4a16_gemv_fixed_ymm.inc"

}  // namespace svdq::cpu::avxvnni
