// AVX-512 (F/BW/VL/DQ) quantize_act: the driver of quantize_x86.inc on zmm vectors, for the
// avx512vnni path, because the fused down projection (x̂ @ lora_down, 2·M·K·R flops) dominates
// quantize_act at large K and is FMA-bound. Register tiles of 8 rows x 2 zmm (16 FMA chains, one
// embedded broadcast each) cover the FMA latency at two per cycle; a group is 4 zmm, packed to
// nibbles with vpmovdb / vpmovwb instead of the ymm lane-crossing packs.
// Compiled with this path's flags only (CMakeLists.txt); nothing here instantiates a std:: template.
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::avx512 {

#include "quantize_zmm.inc"

#include "quantize_x86.inc"

}  // namespace svdq::cpu::avx512
