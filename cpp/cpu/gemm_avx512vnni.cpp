// AVX-512 VNNI (EVEX vpdpbusd on ymm, AVX512VL: Ice Lake, Sapphire Rapids, Zen 4) W4A4 GEMM:
// the AVX2 kernel with one vpdpbusd per weight vector instead of vpmaddubsw + vpaddw, and 32-bit
// sums (no per-group widening). Same tiles, packing, blocking and epilogue (gemm_x86.inc);
// quantize_act and the int4 packing of this path are the AVX2 ones (dispatch.cpp). Compiled with
// this path's flags only (CMakeLists.txt).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"
#include "scalar.h"

#define SVDQ_GEMM_VNNI 1
#define SVDQ_DPBUSD_ASM "vpdpbusd"

namespace svdq::cpu::avx512vnni {

#include "gemm_x86.inc"

}  // namespace svdq::cpu::avx512vnni
