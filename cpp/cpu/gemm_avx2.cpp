// AVX2 W4A4 GEMM (vpmaddubsw + vpmaddwd) on the tile layout of gemm_layout.h: the ymm tiles
// (gemm_tile_ymm.inc), the few-rows path on the canonical weights (gemm_direct_ymm.inc), the shared
// driver (gemm_driver.inc) and the vpmaddubsw peak loop (peak_loop.inc). quantize_act of this path is
// avx2.cpp's. Compiled with this path's flags only (CMakeLists.txt).
#include <immintrin.h>

#include <cstring>
#include <type_traits>

#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx2 {

#include "gemm_tile_ymm.inc"
#include "gemm_direct_ymm.inc"
#include "gemm_driver.inc"
#include "peak_loop.inc"

}  // namespace svdq::cpu::avx2
