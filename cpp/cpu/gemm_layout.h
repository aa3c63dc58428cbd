// Packed weight layout of the CPU W4A4 GEMM (built by diffusers_svdquant/ops.py `pack_gemm_weights`
// from the canonical qweight / wscales / lora_up / bias, kept in non-persistent buffers; never on disk).
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
//   sw[t][g][16]      float32 weight scales (0 in padding columns)
//   lora_up[t][r][16] float32, lanes are columns
//   bias[t*16 + c]    float32, zero padded
//
// The canonical qweight / wscales / lora_up / bias stay the persistent state (save_pretrained); this
// copy is rebuilt from them whenever they change (SVDQuantLinear keeps it out of the state dict).
#pragma once

#include <cstdint>

namespace svdq::cpu {

constexpr int64_t kTileN = 16;
constexpr int64_t kTileBytes = 512;  // per (tile, group): 16 columns x 64 k x 4 bits
constexpr int64_t kRowsPerBlock = 4;  // activation rows per micro-kernel call

// Arguments of gemm_w4a4, shared by every path.
struct GemmArgs {
  const uint8_t* q_x;      // [M, K/2] packed activation codes (reference.pack_int4 order)
  const float* s_x;        // [M, G]
  const float* lora_act;   // [M, R] (null when R == 0)
  const uint8_t* wp;       // [T, G, 512] see above
  const float* sw;         // [T, G, 16]
  const float* lora_up;    // [T, R, 16] (null when R == 0)
  const float* bias;       // [T * 16] or null
  float* y;                // [M, N] float32 output
  int64_t M, N, K, R;
  int num_threads;
};

}  // namespace svdq::cpu
