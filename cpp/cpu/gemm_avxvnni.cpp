// AVX-VNNI (VEX vpdpbusd on ymm: Alder Lake and later, Zen 5) W4A4 GEMM: the AVX2 kernels with one
// vpdpbusd per weight vector instead of vpmaddubsw + vpaddw, and 32-bit sums (no per-group widening).
// Same tiles, packing, blocking and epilogue (gemm_tile_ymm.inc, gemm_direct_ymm.inc, gemm_driver.inc);
// quantize_act of this path is the AVX2 one (dispatch.cpp). Compiled with this path's flags only
// (CMakeLists.txt).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

#define SVDQ_GEMM_VNNI 1
#define SVDQ_DPBUSD_ASM "%{vex%} vpdpbusd"  // %{ %}: literal braces in GCC asm templates

namespace svdq::cpu::avxvnni {

#include "gemm_tile_ymm.inc"
#include "gemm_direct_ymm.inc"
#include "gemm_driver.inc"

// The peak loop's vector: the GEMM's own width.
typedef __m256i PeakVec;
inline PeakVec peak_set1(char v) { return _mm256_set1_epi8(v); }
inline PeakVec peak_add(PeakVec x, PeakVec y) { return _mm256_add_epi32(x, y); }
inline int32_t peak_lane0(PeakVec x) { return _mm_cvtsi128_si32(_mm256_castsi256_si128(x)); }

#include "peak_loop.inc"

}  // namespace svdq::cpu::avxvnni
