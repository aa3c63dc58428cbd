// Tile layout of the CPU W4A4 GEMM. The kernels take the canonical tensors (DESIGN.md §2) and build
// these tiles themselves (pack_tile, per ISA): a whole layer once per call into a scratch buffer when
// many row chunks reuse it, or one tile at a time into a per-thread buffer when one chunk covers all
// rows. No second copy of the weights stays resident. diffusers_svdquant/ops.py `pack_gemm_weights`
// is the same layout in torch: the specification the native packing is tested against.
//
// Output columns are taken 16 at a time ("N tile", kTileN), padded with zero columns at the end.
// For tile t and group g (64 values of K) the weights take 512 bytes, 4 bits per code, stored as
// q + 8 in [0, 15] (unsigned: vpmaddubsw's unsigned operand):
//
//   wp[t][g][k4][c*4 + j]    k4 in 0..15 (4 consecutive k), c in 0..7, j in 0..3
//     low nibble  = code of column 16t + c     at k = 64g + 4*k4 + j, plus 8
//     high nibble = code of column 16t + 8 + c at the same k, plus 8
//
// One 32-byte load and a mask / shift give two vectors of 8 columns x 4 k. With the 4 signed
// activation codes q_x[m, 64g+4k4 .. +3] broadcast to every 32-bit lane, vpmaddubsw + vpmaddwd leave
// lane c holding that column's 4-term dot product: lanes are columns, no horizontal sums.
// (q_w + 8)·q_x = q_w·q_x + 8·Σq_x, so each row's per-group 8·Σq_x is subtracted once per group.
//
// Per tile, beside the nibbles, with lanes as columns:
//   sw[g][16]       float32 weight scales (0 in padding columns)
//   lora_up[r][16]  float32
//   bias[16]        float32 (0 in padding columns, or when the layer has none)
#pragma once

#include <cstdint>

namespace svdq::cpu {

constexpr int64_t kTileN = 16;
constexpr int64_t kTileBytes = 512;   // per (tile, group): 16 columns x 64 k x 4 bits
constexpr int64_t kRowsPerBlock = 4;  // activation rows per micro-kernel call

// Arguments of gemm_w4a4, shared by every path: the canonical weights (DESIGN.md §2).
struct GemmArgs {
  const uint8_t* q_x;      // [M, K/2] packed activation codes (reference.pack_int4 order)
  const float* s_x;        // [M, G]
  const float* lora_act;   // [M, R] (null when R == 0)
  const uint8_t* qweight;  // [N, K/2] two's-complement nibbles, element 2j low
  const void* wscales;     // [N, G] wdtype
  const void* lora_up;     // [N, R] wdtype (null when R == 0)
  const void* bias;        // [N] wdtype, or null
  int wdtype;              // DType of wscales / lora_up / bias (kernels.h)
  float* y;                // [M, N] float32 output
  int64_t M, N, K, R;
  int num_threads;
};

// One tile in the kernel layout (pointers into a caller's buffer).
struct Tile {
  uint8_t* wp;  // [G][512]
  float* sw;    // [G][16]
  float* lu;    // [R][16]
  float* bias;  // [16]
};

}  // namespace svdq::cpu
