// AVX-512 VNNI + AMX-BF16 (Sapphire Rapids and later) W4A4 GEMM: the avx512vnni GEMM (same tiles, driver,
// micro-kernel and direct path, gemm_avx512vnni.cpp) whose tile path computes the low-rank branch
// lora_act · lora_upᵀ on AMX tiles before the epilogue when y and the weights are bfloat16. tdpbf16ps does
// 16 rows x 16 columns x 32 ranks per instruction, about 15x the float32 FMAs' rate on this CPU, where the
// branch of a layer with two fused rank-32 LoRAs (rank 96) was 8-10% of the layer (docs/design.md §4).
// lora_up is bfloat16 already (exact); lora_act is rounded to bfloat16, the one departure from the float32
// branch, within the bound docs/design.md §1 states. float32 / float16 outputs, and M <= 8 (the direct
// path), keep the float32 branch. (vdpbf16ps, AVX512-BF16's dot product, is no way out: on this CPU it
// issues one per 2 cycles against 2 FMAs per cycle, half the FMAs' rate per product.)
// Compiled with this path's flags only (CMakeLists.txt); the OS must grant the process the AMX state
// (dispatch.cpp asks for it before listing this path).
#include <cstring>
#include <type_traits>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced

#include "kernels.h"
#include "scalar.h"

#define SVDQ_GEMM_VNNI 1
#define SVDQ_DPBUSD_ASM "vpdpbusd"
#define SVDQ_GEMM_BRANCH_PLAN 1

namespace svdq::cpu::avx512amx {

#include "gemm_tile_zmm.inc"
#include "gemm_direct_zmm.inc"

namespace {

constexpr int64_t kAmxRows = 16;   // rows of a C (output) tile
constexpr int64_t kAmxRanks = 32;  // bf16 ranks per tdpbf16ps (64-byte A rows)

// Palette 1: tiles 0 and 1 are C (the step's two 16-column output tiles: 16 rows x 16 float32), 2 is A
// (16 rows x 32 ranks of lora_act, bf16), 3 and 4 are B (16 rank pairs x 16 columns x 2, bf16: the
// VNNI order tdpbf16ps takes, lane c of row p = lora_up[n0 + c, 2p .. 2p + 1]). Every row 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64};
  uint8_t rows[16] = {kAmxRows, kAmxRows, kAmxRows, kAmxRows, kAmxRows};
};

// The branch on AMX tiles (gemm_driver.inc calls these hooks). Per call, lora_act [M, R] float32 is
// rounded to bf16 once into la [M + 16, R32] (R32: R rounded up to 32; padding ranks and the 16 rows past
// M are zeros, so a C tile may run past the chunk's last row: those sums are never stored). Per packed
// tile, its lora_up (float32 lanes, from pack_tile) becomes bf16 pairs in the thread's slot. Per step of a
// row chunk, each 16-row block of the chunk's sums is loaded as C, gets A·B over R32 / 32 ranks, and is
// stored back; the epilogue then adds only the bias (epilogue_args: R = 0).
struct BranchPlan {
  const GemmArgs& a;
  GemmArgs no_branch;
  bool on;
  int64_t R32, slots;
  Buffer<uint16_t> la;  // [M + kAmxRows, R32]
  Buffer<uint16_t> lu;  // [threads][slots][R32 / 2][16][2]

  BranchPlan(const GemmArgs& args, int64_t panel_tiles)
      : a(args),
        no_branch(args),
        on(args.R > 0 && args.ydtype == static_cast<int>(DType::kBFloat16) &&
           args.wdtype == static_cast<int>(DType::kBFloat16)),
        R32(ceil_div(args.R, kAmxRanks) * kAmxRanks),
        slots(panel_tiles),
        la(on ? (args.M + kAmxRows) * R32 : 1),
        lu(on ? args.num_threads * panel_tiles * R32 * kTileN : 1) {
    no_branch.R = 0;
    if (!on) return;
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t c = 0; c < R32; c += 16) {
        const int64_t n = min_i64(16, a.R - c);
        const __m512 v = n > 0 ? _mm512_maskz_loadu_ps(lane_mask(n), a.lora_act + m * a.R + c) : _mm512_setzero_ps();
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(la.p + m * R32 + c), _mm512_cvtepi32_epi16(bf16_bits(v)));
      }
    std::memset(la.p + a.M * R32, 0, sizeof(uint16_t) * kAmxRows * R32);
  }
  const GemmArgs& epilogue_args() const { return on ? no_branch : a; }

  void begin_thread() const {
    if (!on) return;
    const TileConfig cfg;
    _tile_loadconfig(&cfg);
  }
  void end_thread() const {
    if (on) _tile_release();
  }

  uint16_t* slot_pairs(int tid, int64_t slot) const { return lu.p + (tid * slots + slot) * R32 * kTileN; }

  // lora_up[t] in lanes (tile.lu: float32 [R][16], bf16 values) -> pairs [R32 / 2][16] of (rank 2p, 2p + 1).
  void pack(const Tile& tile, int tid, int64_t slot) const {
    if (!on) return;
    uint16_t* dst = slot_pairs(tid, slot);
    for (int64_t p = 0; p < R32 / 2; ++p) {
      const int64_t r0 = 2 * p, r1 = 2 * p + 1;
      const __m512 lo = r0 < a.R ? _mm512_loadu_ps(tile.lu + r0 * kTileN) : _mm512_setzero_ps();
      const __m512 hi = r1 < a.R ? _mm512_loadu_ps(tile.lu + r1 * kTileN) : _mm512_setzero_ps();
      _mm512_storeu_si512(dst + p * 2 * kTileN, _mm512_or_si512(bf16_bits(lo), _mm512_slli_epi32(bf16_bits(hi), 16)));
    }
  }

  // acc[j][row] (j < nt, rows [0, m_end - m_begin) of the chunk) += la[m_begin + row] · lora_up of tile slot + j.
  template <typename Acc>
  void run(int tid, int64_t slot, int64_t nt, int64_t m_begin, int64_t m_end, Acc& acc) const {
    static_assert(sizeof(acc[0]) / sizeof(acc[0][0]) % kAmxRows == 0, "C tiles cover whole 16-row blocks");
    if (!on) return;
    const uint16_t* b0 = slot_pairs(tid, slot);
    const uint16_t* b1 = b0 + R32 * kTileN;
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kAmxRows) {
      const int64_t row = m0 - m_begin;
      const uint16_t* A = la.p + m0 * R32;
      _tile_loadd(0, acc[0][row], 64);
      if (nt == 2) _tile_loadd(1, acc[1][row], 64);
      for (int64_t c = 0; c < R32; c += kAmxRanks) {
        _tile_loadd(2, A + c, R32 * 2);
        _tile_loadd(3, b0 + c * kTileN, 64);
        _tile_dpbf16ps(0, 2, 3);
        if (nt == 2) {
          _tile_loadd(4, b1 + c * kTileN, 64);
          _tile_dpbf16ps(1, 2, 4);
        }
      }
      _tile_stored(0, acc[0][row], 64);
      if (nt == 2) _tile_stored(1, acc[1][row], 64);
    }
  }
};

}  // namespace

#include "gemm_driver.inc"

}  // namespace svdq::cpu::avx512amx
