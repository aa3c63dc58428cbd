// AVX-512 VNNI (EVEX vpdpbusd on zmm: Ice Lake, Sapphire Rapids, Zen 4, Zen 5) W4A4 GEMM: the x86
// kernel with one vpdpbusd per row, tile and step on a whole 16-column zmm of weights, blocks of 6
// rows x 2 tiles, 32-bit sums (no per-group widening), and a zmm epilogue; up to 8 rows it reads the
// canonical weights directly instead (gemm_direct). Same tiles, packing and blocking (gemm_x86.inc);
// quantize_act is quantize_avx512.cpp's, the int4 packing the AVX2 one (dispatch.cpp).
// Compiled with this path's flags only (CMakeLists.txt).
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "scalar.h"

#define SVDQ_GEMM_VNNI 1
#define SVDQ_GEMM_ZMM 1
#define SVDQ_DPBUSD_ASM "vpdpbusd"

namespace svdq::cpu::avx512vnni {

#include "gemm_x86.inc"

}  // namespace svdq::cpu::avx512vnni
