// AVX-512 VNNI (EVEX vpdpbusd on zmm: Ice Lake, Sapphire Rapids, Zen 4, Zen 5) W4A4 GEMM: one vpdpbusd
// per row, tile and step on a whole 16-column zmm of weights, blocks of 6 rows x 2 tiles, 32-bit sums
// (no per-group widening) and a zmm epilogue (gemm_tile_zmm.inc); up to 8 rows it reads the canonical
// weights directly instead (gemm_direct_zmm.inc). Same tiles and driver as the ymm paths
// (gemm_driver.inc); quantize_act is quantize_avx512.cpp's. Compiled with this path's flags only
// (CMakeLists.txt).
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced

#include "kernels.h"
#include "scalar.h"

#define SVDQ_GEMM_VNNI 1
#define SVDQ_DPBUSD_ASM "vpdpbusd"

namespace svdq::cpu::avx512vnni {

#include "gemm_tile_zmm.inc"
#include "gemm_direct_zmm.inc"
#include "gemm_driver.inc"

// The peak loop's vector: the GEMM's own width.
typedef __m512i PeakVec;
inline PeakVec peak_set1(char v) { return _mm512_set1_epi8(v); }
inline PeakVec peak_add(PeakVec x, PeakVec y) { return _mm512_add_epi32(x, y); }
inline int32_t peak_lane0(PeakVec x) { return _mm_cvtsi128_si32(_mm512_castsi512_si128(x)); }

#include "peak_loop.inc"

}  // namespace svdq::cpu::avx512vnni
