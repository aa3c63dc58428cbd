// The W4A16 linear on AMX-BF16 tiles (reference.linear_w4a16 with bfloat16 operands), for the many-row
// regime of the amx path: the 4-bit weights are decoded into tiles on the fly, never into a dense copy.
// Operands, numerics, blocking and driver: w4a16_bf16_driver.inc; here the engine: per run, _tile_dpbf16ps on
// pairs of m tiles (4 C tiles: the block's two A tiles × 2 B tiles), B tiles prefetched into L1 two steps ahead.
//
// Compiled with the amx path's flags only (CMakeLists.txt); dispatch.cpp enables it only when the CPU has
// AMX-BF16 and AVX512-BF16, the OS saves the tile state, and Linux granted this process the tile data.
#include <cstring>

#include "avx512_intrin.h"  // <immintrin.h>, GCC 12's false warnings silenced
#include "kernels.h"
#include "scalar.h"

namespace svdq::cpu::amx {
namespace {

#include "w4a16_bf16_driver.inc"

struct alignas(64) TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0, 1: A (W rows of the block's two halves); 2, 3: B (two m tiles); 4..7: C = (A0|A1) × (B2|B3).
void configure_tiles() {
  TileConfig c;
  std::memset(&c, 0, sizeof(c));
  c.palette = 1;
  for (int t = 0; t < 8; ++t) {
    c.colsb[t] = 64;
    c.rows[t] = 16;
  }
  _tile_loadconfig(&c);
}

// Steps of one decoded run on m tiles j (and j + 1 when MT = 2): C tiles from c (or zero), back into c.
// c holds [MT][2][16 n][16 m] float32 for these m tiles.
// The B tiles (1 KiB each, 16 lines) of step s + kBAhead are prefetched into L1 during step s: a tile load
// from L2 waits for the tile products still reading that tile register (tiles are not renamed), so its
// latency adds to every step. Past the run's last step, bn's (the next pair of m tiles) are prefetched.
inline void prefetch_tile(const uint16_t* t) {
  for (int l = 0; l < 16; ++l) _mm_prefetch(reinterpret_cast<const char*>(t) + 64 * l, _MM_HINT_T0);
}
constexpr int64_t kBAhead = 2;

template <int MT>
void run_tiles(const uint16_t* ap, const uint16_t* b, const uint16_t* bn, int64_t S, int64_t steps, float* c,
               bool first) {
  if (first) {
    _tile_zero(4);
    _tile_zero(5);
    if constexpr (MT == 2) {
      _tile_zero(6);
      _tile_zero(7);
    }
  } else {
    _tile_loadd(4, c, 64);
    _tile_loadd(5, c + 256, 64);
    if constexpr (MT == 2) {
      _tile_loadd(6, c + 512, 64);
      _tile_loadd(7, c + 768, 64);
    }
  }
  for (int64_t s = 0; s < steps; ++s) {
    const int64_t t = s + kBAhead;
    const uint16_t* p = t < steps ? b + t * kTileWords : bn != nullptr ? bn + (t - steps) * kTileWords : nullptr;
    if (p != nullptr) {
      prefetch_tile(p);
      if (MT == 2) prefetch_tile(p + S * kTileWords);  // the pair's second m tile
    }
    _tile_loadd(0, ap + s * 2 * kTileWords, 64);
    _tile_loadd(1, ap + s * 2 * kTileWords + kTileWords, 64);
    _tile_loadd(2, b + s * kTileWords, 64);
    _tile_dpbf16ps(4, 0, 2);
    _tile_dpbf16ps(5, 1, 2);
    if constexpr (MT == 2) {
      _tile_loadd(3, b + (S + s) * kTileWords, 64);
      _tile_dpbf16ps(6, 0, 3);
      _tile_dpbf16ps(7, 1, 3);
    }
  }
  _tile_stored(4, c, 64);
  _tile_stored(5, c + 256, 64);
  if constexpr (MT == 2) {
    _tile_stored(6, c + 512, 64);
    _tile_stored(7, c + 768, 64);
  }
}

struct Engine {
  static constexpr int64_t kSteps = 8;               // tile steps per decoded run: 2 × 8 KiB of A (4, 16: slower)
  static constexpr int64_t kXChunkBytes = 7 << 18;   // packed x̂ᵀ per K chunk: 7/8 of a core's L2 (2 MiB here)
  static constexpr int64_t kMaxBlockRows = 384;      // rows per pass (linear_rows)
  static constexpr int64_t kPrefetchRuns = 1;       // decode_a prefetches the codes of the next run
  static constexpr bool kStepMajor = false;          // an m tile's steps in a row: one stream per tile
  static void begin() { configure_tiles(); }
  static void end() { _tile_release(); }
  static void run(const uint16_t* ap, const uint16_t* b, int64_t S, int64_t MT, int64_t steps, float* c,
                  bool first) {
    for (int64_t j = 0; j < MT; j += 2) {
      const uint16_t* bj = b + j * S * kTileWords;
      const uint16_t* bn = j + 2 < MT ? bj + 2 * S * kTileWords : nullptr;
      if (j + 1 < MT) {
        run_tiles<2>(ap, bj, bn, S, steps, c + j * 512, first);
      } else {
        run_tiles<1>(ap, bj, bn, S, steps, c + j * 512, first);
      }
    }
  }
};


}  // namespace

void linear_w4a16(const W4A16Args& a) { linear_rows<Engine>(a); }

}  // namespace svdq::cpu::amx
