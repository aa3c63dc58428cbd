// Tile layout of the CPU W4A4 GEMM. The kernels take the canonical tensors (docs/design.md §2) and build
// these tiles themselves (pack_tile, per ISA): a whole layer once per call into a scratch buffer when
// many row chunks reuse it, or one tile at a time into a per-thread buffer when one chunk covers all
// rows. No second copy of the weights stays resident. diffusers_svdquant/ops.py `pack_gemm_weights`
// is the same layout in torch: the specification the native packing is tested against.
//
// Output columns are taken 16 at a time ("N tile", kTileN), padded with zero columns at the end.
// For tile t and group g (64 values of K) the weight codes take 1024 bytes, one signed byte per code
// (the nibbles are unpacked here, once per call, not in the inner loop):
//
//   wq[t][g][k4][h][c*4 + j]    k4 in 0..15 (4 consecutive k), h in 0..1, c in 0..7, j in 0..3
//     = code of column 16t + 8h + c at k = 64g + 4*k4 + j, in [-8, 7]
//
// Two 32-byte loads give two vectors of 8 columns x 4 k. The activation codes are made unsigned,
// q_x + 8 in [0, 15] (the u8 operand of vpmaddubsw / vpdpbusd); with 4 of them broadcast to every
// 32-bit lane, lane c holds that column's 4-term dot product: lanes are columns, no horizontal sums.
// (q_x + 8)·q_w = q_x·q_w + 8·Σq_w: the correction depends on the weights alone, so it is stored:
//
//   wsum[t][g][16]  int16, −8·Σ_k q_w over the group (in [−3584, 4096]; 0 in padding columns)
//
// and the kernels start each group's integer sums from it.
//
// Per tile, beside the codes, with lanes as columns:
//   sw[g][16]       float32 weight scales (0 in padding columns)
//   lora_up[r][16]  float32
//   bias[16]        float32 (0 in padding columns, or when the layer has none)
#pragma once

#include <cstdint>

namespace svdq::cpu {

constexpr int64_t kTileN = 16;
constexpr int64_t kTileBytes = 1024;   // codes per (tile, group): 16 columns x 64 k, one byte each
constexpr int64_t kTileSumBytes = 32;  // wsum per (tile, group): 16 int16

// Arguments of gemm_w4a4, shared by every path: the canonical weights (docs/design.md §2).
struct GemmArgs {
  const uint8_t* q_x;      // [M, K/2] packed activation codes (reference.pack_int4 order)
  const float* s_x;        // [M, G]
  const float* lora_act;   // [M, R] (null when R == 0)
  const uint8_t* qweight;  // [N, K/2] two's-complement nibbles, element 2j low
  const void* wscales;     // [N, G] wdtype
  const void* lora_up;     // [N, R] wdtype (null when R == 0)
  const void* bias;        // [N] wdtype, or null
  int wdtype;              // DType of wscales / lora_up / bias (kernels.h)
  void* y;                 // [M, N] output, ydtype
  int ydtype;              // DType of y (kernels.h): float32, or bfloat16 / float16 rounded to nearest even
  int64_t M, N, K, R;
  int num_threads;
};

// One tile in the kernel layout (pointers into a caller's buffers). A tile's bytes are the codes of
// all its groups followed by their sums: G * (kTileBytes + kTileSumBytes), wsum at wq + G * kTileBytes.
struct Tile {
  int8_t* wq;     // [G][1024]
  int16_t* wsum;  // [G][16]
  float* sw;      // [G][16]
  float* lu;      // [R][16]
  float* bias;    // [16]
};

// The tile whose bytes start at `bytes` and floats at `floats` ((G + R + 1) * 16 of them). Static:
// each translation unit (each ISA path, compiled with its own flags) keeps its own copy.
static inline Tile tile_at(uint8_t* bytes, float* floats, int64_t G, int64_t R) {
  return Tile{reinterpret_cast<int8_t*>(bytes), reinterpret_cast<int16_t*>(bytes + G * kTileBytes), floats,
              floats + G * kTileN, floats + (G + R) * kTileN};
}

}  // namespace svdq::cpu
