// quantize_act for the avx512amx path's whole linear (KernelTable::quantize_act_linear, used by _C.linear
// only): quantize_avx512.cpp's zmm quantize_act whose down projection x̂ · lora_down runs on AMX-BF16 tiles
// when x is bfloat16 and M > 8, instead of float32 FMAs (a tdpbf16ps is 16 rows x 16 ranks x 32 k). lora_down
// is bfloat16 (exact) and is staged once per call as bf16 pairs [K/2][Rp] (k = 2p in the low half, 2p + 1 in
// the high half: the B layout tdpbf16ps takes); x̂ is rounded to bfloat16 per K block (vcvtne2ps2bf16), the
// one departure from the float32 lora_act, within the bound docs/design.md §1 states for a bf16 linear. The
// codes and scales are quantize_avx512.cpp's, bit for bit. The canonical quantize_act op keeps the float32
// down projection (its lora_act is a float32 output). Compiled with this path's flags only (CMakeLists.txt).
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

#define SVDQ_QUANT_LORA_PLAN 1

namespace svdq::cpu::avx512amx {

#include "quantize_zmm.inc"

namespace {

constexpr int64_t kAmxRows = 16;  // rows of a tile; the K block of one tdpbf16ps is 32 (64-byte A rows)
// From 9 rows (the GEMM's tile path too): below, staging lora_down costs about what the FMAs it saves do.
constexpr int64_t kAmxMinRows = 9;

// Palette 1: tile 0 is C (16 rows x 16 ranks of acc, float32), 1 is A (16 rows x 32 k of x̂, bf16), 2 is B
// (16 k pairs x 16 ranks x 2, bf16). Every row 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64};
  uint8_t rows[16] = {kAmxRows, kAmxRows, kAmxRows};
};

struct LoraPlan {
  bool on_;
  int64_t Rp;
  Buffer<uint32_t> pairs;  // [K/2][Rp]: lora_down rows 2p and 2p + 1, bf16, columns R..Rp-1 zero

  LoraPlan(const void* lora_down, DType dtype, int64_t M, int64_t K, int64_t R, int64_t Rp_)
      : on_(dtype == DType::kBFloat16 && R > 0 && M >= kAmxMinRows), Rp(Rp_), pairs(on_ ? K / 2 * Rp_ : 1) {
    if (!on_) return;
    const uint16_t* d = static_cast<const uint16_t*>(lora_down);
    for (int64_t p = 0; p < K / 2; ++p)
      for (int64_t c = 0; c < Rp; c += 16) {
        const __mmask16 m = lane_mask_16(R - c);
        const __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, d + 2 * p * R + c));
        const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, d + (2 * p + 1) * R + c));
        _mm512_storeu_si512(pairs.p + p * Rp + c, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
      }
  }
  static __mmask16 lane_mask_16(int64_t n) {
    return static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
  }
  bool on() const { return on_; }
  void tile_begin() const {
    if (!on_) return;
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  void tile_end() const {
    if (on_) _tile_release();
  }

  // acc [mt, Rp] += bf16(xh [mt, xs]) · lora_down[k0 .. k0 + kn) (kn: whole groups) over whole 16-row blocks:
  // rows past mt read zeros and write sums that quantize_tile never copies out (acc has kTileRows rows).
  void block(const float* xh, int64_t xs, int64_t k0, int64_t kn, int64_t mt, float* acc, float* scratch) const {
    static_assert(kTileRows % kAmxRows == 0, "C tiles cover whole 16-row blocks of acc");
    uint16_t* xb = reinterpret_cast<uint16_t*>(scratch);  // [rows][xs] bf16, in w's memory
    const int64_t rows = ceil_div(mt, kAmxRows) * kAmxRows;
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t k = 0; k < kn; k += 32) {
        __m512i v = _mm512_setzero_si512();
        if (t < mt) {
          const float* src = xh + t * xs + k;
          v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + 16), _mm512_loadu_ps(src)));
        }
        _mm512_storeu_si512(xb + t * xs + k, v);
      }
    for (int64_t rb = 0; rb < rows; rb += kAmxRows)
      for (int64_t c = 0; c < Rp; c += 16) {
        float* C = acc + rb * Rp + c;
        _tile_loadd(0, C, Rp * 4);
        for (int64_t kc = 0; kc < kn; kc += 32) {
          _tile_loadd(1, xb + rb * xs + kc, xs * 2);
          _tile_loadd(2, pairs.p + (k0 + kc) / 2 * Rp + c, Rp * 4);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, C, Rp * 4);
      }
  }
};

}  // namespace

#include "quantize_x86.inc"

}  // namespace svdq::cpu::avx512amx
