// <immintrin.h> for the AVX-512 translation units (gemm_avx512vnni.cpp, quantize_avx512.cpp), which
// include this instead. GCC 12's avx512fintrin.h self-initialises its _mm512_undefined_* values and then
// warns about them wherever an intrinsic is inlined (GCC bug 105593, fixed in GCC 13): noise, not a
// finding, so only those files silence the two warnings.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ == 12
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
