// linear_w4a16 on CUDA, part 2: the tiled GEMM (M > 16), the launch plan and the entry point.
//
// GEMM: a 256-thread block computes BM (128, or 64 when 128-row tiles would not fill the GPU) x 128 outputs
// with 8 warps as 2 (M) x 4 (N), (BM/2) x 32 each, on mma.sync.m16n8k16 (bf16 or f16 in, float32 accumulators).
// K advances one 64-group per stage of a 3-stage cp.async pipeline; a stage holds
//   A: the BM x 64 tile of x itself (16-bit, canonical), rows of 128 bytes in 16-byte chunks stored at chunk
//      c ^ (row % 8), so the ldmatrix.x4 of an m16 x k16 tile reads 8 distinct bank groups per matrix;
//   the 128 x 32 bytes of canonical codes, and 1 / smooth for the 64 k (prologue, float32).
// The smoothing is folded into the weights instead of the activations: x̂ W_gᵀ = x (W_g / smooth)ᵀ, and
//   W'[n, k] = (q · s[n, g] + m[n, g]) · (1 / smooth[k])      (float32, rounded once to bf16 / f16)
// so x enters the tensor cores exact and only W' is rounded (as bf16 F.linear rounds its weight).
// Thread t dequantizes 32 k (half t % 2) of row t / 2 into a 128 x 64 16-bit tile, stored like A (swizzled
// rows [n][k]): an ldmatrix.x4 (not .trans) of it is the m16n8k16 .col B fragments of two n8 tiles.
// The tile is double-buffered: iteration g dequantizes group g + 1 while the tensor cores run group g, with
// one __syncthreads per group. Scales and minima (2-byte, strided) are loaded into registers a group ahead.
// Epilogue: + lora_act · lora_up (float32 FMAs, 32 ranks at a time through shared memory) + bias; stored in
// the 16-bit dtype, two columns per 32-bit store. Rows past M are zero-filled and never stored; columns past
// N have zero codes, scales and minima.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .bf16/.f16; g = lane / 4, t = lane % 4): A regs {a0a1, a2a3, a4a5,
// a6a7} = (row g, k 2t..2t+1), (g + 8, 2t..), (g, 2t + 8..), (g + 8, 2t + 8..); B regs {b0b1, b2b3} =
// (k 2t..2t+1, col g), (k 2t + 8.., col g); C {c0, c1, c2, c3} = (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1).
// ldmatrix.x4: lanes 8i..8i+7 address the rows of matrix i; register i of lane l = row l / 4, elements
// 2 (l % 4), 2 (l % 4) + 1 of matrix i. tests/test_cuda_w4a16.py emulates this data flow on the CPU.
#include <algorithm>
#include <atomic>

#include "w4a16.cuh"

namespace svdq::cuda {
namespace w4a16 {
namespace {

constexpr int kBK = kGroupSize, kThreads = 256, kStages = 3;

template <int BM>
struct Tile {
  static constexpr int kABytes = BM * kBK * 2;
  static constexpr int kBBytes = kGemmBN * kBK / 2;
  static constexpr int kInvBytes = kBK * 4;
  static constexpr int kStageBytes = kABytes + kBBytes + kInvBytes;
  static constexpr int kDqBytes = kGemmBN * kBK * 2;
  static constexpr int kSmemBytes = kStages * kStageBytes + 2 * kDqBytes;
  static constexpr int kMI = BM / 32;  // m16 tiles per warp
  static constexpr int kLaStride = BM + 1;
  static_assert(kProRankTile * (kLaStride + kGemmBN) * 4 <= kSmemBytes, "epilogue tiles must fit the pipeline");
  static_assert(kSmemBytes <= 99 * 1024, "shared memory beyond sm_86/sm_89's 99 KB per block");
};

// Byte offset of 16-byte chunk c (0..7) of 128-byte row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t swz(int row, int c) {
  return static_cast<uint32_t>(row * 128 + ((c ^ (row & 7)) << 4));
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T, int BM>
__global__ void __launch_bounds__(kThreads, 1) gemm_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  using Cfg = Tile<BM>;
  constexpr int MI = Cfg::kMI;
  extern __shared__ __align__(128) uint8_t gemm_smem[];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;
  const int gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * kGemmBN;
  const int groups = p.K / kBK;
  const T* x = static_cast<const T*>(p.x);
  const uint32_t smem0 = smem_addr(gemm_smem);
  const uint32_t dq0 = smem0 + kStages * Cfg::kStageBytes;

  // This thread's share of the dequantization: 32 k (half dh) of tile row dn.
  const int dn = tid >> 1, dh = tid & 1;
  const bool dn_ok = n0 + dn < p.N;
  const int dn_row = dn_ok ? n0 + dn : 0;
  const uint16_t* srow = p.wscales + static_cast<size_t>(dn_row) * groups;
  const uint16_t* mrow = p.wmins + static_cast<size_t>(dn_row) * groups;

  auto load_stage = [&](int g, int stage) {
    const uint32_t st = smem0 + stage * Cfg::kStageBytes;
#pragma unroll
    for (int i = tid; i < BM * 8; i += kThreads) {  // A: BM rows x 8 chunks
      const int row = i >> 3, c = i & 7, m = m0 + row;
      const bool ok = m < p.M;
      cp_async16(st + swz(row, c), x + static_cast<size_t>(ok ? m : 0) * p.K + g * kBK + c * 8, ok);
    }
    // Codes: thread t copies the 16 bytes it dequantizes (row dn, half dh).
    cp_async16(st + Cfg::kABytes + tid * 16, p.qweight + static_cast<size_t>(dn_row) * (p.K / 2) + g * 32 + dh * 16,
               dn_ok);
    if (tid < kBK / 4)
      cp_async16(st + Cfg::kABytes + Cfg::kBBytes + tid * 16, p.inv_smooth + g * kBK + tid * 4, true);
  };

  auto load_scales = [&](int g, uint16_t& sb, uint16_t& mb) {
    sb = 0, mb = 0;  // bits of +0.0: padding rows dequantize to zero
    if (dn_ok && g < groups) sb = __ldg(srow + g), mb = __ldg(mrow + g);
  };

  auto dequant = [&](int stage, int buf, uint16_t sb, uint16_t mb) {
    const uint8_t* st = gemm_smem + stage * Cfg::kStageBytes;
    const uint4 raw = *reinterpret_cast<const uint4*>(st + Cfg::kABytes + tid * 16);
    const float* inv = reinterpret_cast<const float*>(st + Cfg::kABytes + Cfg::kBBytes) + dh * 32;
    const float s = bits_to_float<T>(sb), m = bits_to_float<T>(mb);
    uint8_t* dq = gemm_smem + kStages * Cfg::kStageBytes + buf * Cfg::kDqBytes;
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float q[8];
      nibbles_to_float(words[j], q);
      const float4 ia = *reinterpret_cast<const float4*>(inv + 8 * j);
      const float4 ib = *reinterpret_cast<const float4*>(inv + 8 * j + 4);
      uint4 out;
      out.x = pack2<T>(fmaf(q[0], s, m) * ia.x, fmaf(q[1], s, m) * ia.y);
      out.y = pack2<T>(fmaf(q[2], s, m) * ia.z, fmaf(q[3], s, m) * ia.w);
      out.z = pack2<T>(fmaf(q[4], s, m) * ib.x, fmaf(q[5], s, m) * ib.y);
      out.w = pack2<T>(fmaf(q[6], s, m) * ib.z, fmaf(q[7], s, m) * ib.w);
      *reinterpret_cast<uint4*>(dq + swz(dn, dh * 4 + j)) = out;
    }
  };

  float acc[MI][4][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][nj][c] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < groups) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }
  uint16_t sb, mb;
  load_scales(0, sb, mb);
  cp_async_wait<kStages - 2>();  // stage 0
  __syncthreads();
  dequant(0, 0, sb, mb);
  load_scales(1, sb, mb);

  // ldmatrix.x4 lane addresses. A: matrix lane/8 = (rows +8 if odd, k chunk +1 if >= 2). B: matrix lane/8 =
  // (k chunk +1 if odd, n8 tile +1 if >= 2), so the registers are b[2p][0], b[2p][1], b[2p+1][0], b[2p+1][1].
  const int a_row = wm * (BM / 2) + ((lane >> 3) & 1) * 8 + (lane & 7), a_chunk = lane >> 4;
  const int b_row = wn * 32 + (lane >> 4) * 8 + (lane & 7), b_chunk = (lane >> 3) & 1;

  for (int g = 0; g < groups; ++g) {
    cp_async_wait<kStages - 3>();  // stages <= g + 1 have landed
    __syncthreads();  // ... for every thread; dq[g % 2] is complete; all are done with group g - 1
    if (g + kStages - 1 < groups) load_stage(g + kStages - 1, (g + kStages - 1) % kStages);
    cp_async_commit();
    if (g + 1 < groups) {
      dequant((g + 1) % kStages, (g + 1) & 1, sb, mb);
      load_scales(g + 2, sb, mb);
    }
    const uint32_t a_st = smem0 + (g % kStages) * Cfg::kStageBytes;
    const uint32_t b_st = dq0 + (g & 1) * Cfg::kDqBytes;
#pragma unroll
    for (int ks = 0; ks < kBK / 16; ++ks) {
      uint32_t a[MI][4];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi) ldmatrix_x4(a[mi], a_st + swz(a_row + mi * 16, 2 * ks + a_chunk));
      uint32_t b[4][2];
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        uint32_t r[4];
        ldmatrix_x4(r, b_st + swz(b_row + pp * 16, 2 * ks + b_chunk));
        b[2 * pp][0] = r[0], b[2 * pp][1] = r[1], b[2 * pp + 1][0] = r[2], b[2 * pp + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) mma16816<T>(acc[mi][nj], a[mi], b[nj][0], b[nj][1]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  float* la_s = reinterpret_cast<float*>(gemm_smem);  // [rank][row], stride BM + 1
  float* lu_s = la_s + kProRankTile * Cfg::kLaStride;  // [rank][column]
  const T* lora_up = static_cast<const T*>(p.lora_up);
  for (int r0 = 0; r0 < p.R; r0 += kProRankTile) {
    const int rc = min(kProRankTile, p.R - r0);
    for (int i = tid; i < kProRankTile * BM; i += kThreads) {
      const int rr = i % kProRankTile, row = i / kProRankTile, m = m0 + row;
      la_s[rr * Cfg::kLaStride + row] =
          (m < p.M && rr < rc) ? p.lora_act[static_cast<size_t>(m) * p.R + r0 + rr] : 0.f;
    }
    for (int i = tid; i < kProRankTile * kGemmBN; i += kThreads) {
      const int rr = i / kGemmBN, col = i % kGemmBN, n = n0 + col;
      lu_s[rr * kGemmBN + col] =
          (n < p.N && rr < rc) ? Convert<T>::to_float(lora_up[static_cast<size_t>(n) * p.R + r0 + rr]) : 0.f;
    }
    __syncthreads();
    for (int rr = 0; rr < rc; ++rr) {
      float la[MI][2];
#pragma unroll
      for (int mi = 0; mi < MI; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) la[mi][h] = la_s[rr * Cfg::kLaStride + wm * (BM / 2) + mi * 16 + h * 8 + gid];
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const float2 lu = *reinterpret_cast<const float2*>(lu_s + rr * kGemmBN + wn * 32 + nj * 8 + tig * 2);
#pragma unroll
        for (int mi = 0; mi < MI; ++mi) {
          acc[mi][nj][0] = fmaf(la[mi][0], lu.x, acc[mi][nj][0]);
          acc[mi][nj][1] = fmaf(la[mi][0], lu.y, acc[mi][nj][1]);
          acc[mi][nj][2] = fmaf(la[mi][1], lu.x, acc[mi][nj][2]);
          acc[mi][nj][3] = fmaf(la[mi][1], lu.y, acc[mi][nj][3]);
        }
      }
    }
    __syncthreads();
  }

  T* y = static_cast<T*>(p.y);
  const bool even_n = (p.N & 1) == 0;  // then (row * N + col) is even and a pair store is aligned
#pragma unroll
  for (int nj = 0; nj < 4; ++nj) {
    const int col = n0 + wn * 32 + nj * 8 + tig * 2;
    if (col >= p.N) continue;
    const bool both = col + 1 < p.N;
    const float b0 = bias_term<T>(p, col), b1 = both ? bias_term<T>(p, col + 1) : 0.f;
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * (BM / 2) + mi * 16 + h * 8 + gid;
        if (m < p.M)
          store_pair(y + static_cast<size_t>(m) * p.N + col, acc[mi][nj][2 * h] + b0, acc[mi][nj][2 * h + 1] + b1,
                     both, both && even_n);
      }
  }
#else
  __trap();
#endif
}

template <typename T, int BM>
cudaError_t gemm(const Params& p, int device, cudaStream_t stream) {
  using Cfg = Tile<BM>;
  // Above 48 KB of dynamic shared memory a kernel must opt in, once per device.
  static std::atomic<uint64_t> opted_in{0};
  const uint64_t bit = device < 64 ? uint64_t{1} << device : 0;
  if (bit == 0 || !(opted_in.load() & bit)) {
    const cudaError_t e =
        cudaFuncSetAttribute(gemm_kernel<T, BM>, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (e != cudaSuccess) return e;
    opted_in.fetch_or(bit);
  }
  const dim3 grid((p.N + kGemmBN - 1) / kGemmBN, (p.M + BM - 1) / BM);
  gemm_kernel<T, BM><<<grid, kThreads, Cfg::kSmemBytes, stream>>>(p);
  return finish_launch(stream);
}

template <typename T>
cudaError_t run(const Params& p, const W4A16Plan& plan, int device, cudaStream_t stream) {
  cudaError_t e = launch_prologue<T>(p, plan, stream);
  if (e != cudaSuccess) return e;
  if (plan.gemv) return launch_gemv<T>(p, plan, stream);
  return launch_gemm<T>(p, plan, device, stream);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace

template <typename T>
cudaError_t launch_gemm(const Params& p, const W4A16Plan& plan, int device, cudaStream_t stream) {
  return plan.gemm_bm == 128 ? gemm<T, 128>(p, device, stream) : gemm<T, 64>(p, device, stream);
}

}  // namespace w4a16

std::string plan_w4a16(int64_t M, int64_t N, int64_t K, int64_t R, W4A16Path path, int sms, W4A16Plan* out) {
  using namespace w4a16;
  const std::string fn = "linear_w4a16 (CUDA): ";
  if (M < 0 || N < 0 || K <= 0 || R < 0 || K % kGroupSize != 0)
    return fn + "needs M, N, R >= 0 and K a positive multiple of 64, got M=" + std::to_string(M) +
           ", N=" + std::to_string(N) + ", K=" + std::to_string(K) + ", R=" + std::to_string(R);
  // Kernel indices are int; grid.y and grid.z are at most 65535.
  if (M > int64_t{kProRows} * 65535 || N > INT32_MAX / 2 || K > INT32_MAX / 2 || R > int64_t{kProRankTile} * 65535)
    return fn + "sizes too large (M=" + std::to_string(M) + ", N=" + std::to_string(N) +
           ", K=" + std::to_string(K) + ", R=" + std::to_string(R) + ")";
  if (sms < 1) return fn + "sms must be >= 1, got " + std::to_string(sms);
  if (path == W4A16Path::kGemv && M > kW4A16GemvMaxRows)
    return fn + "the GEMV path takes at most " + std::to_string(kW4A16GemvMaxRows) + " rows, got M=" +
           std::to_string(M);
  W4A16Plan plan;
  plan.gemv = path == W4A16Path::kGemv || (path == W4A16Path::kAuto && M <= kW4A16GemvMaxRows);
  if (M == 0 || N == 0) {
    *out = plan;
    return "";
  }
  const int64_t col_blocks = cdiv(N, kGemvColsPerBlock);
  if (plan.gemv) {
    int mt = 1;
    while (mt < M) mt *= 2;
    plan.gemv_rows = mt;
    // The slice's x̂ and sums fit kGemvSmemBudget; split further (each slice >= 1024 k) until the grid has
    // about 4 blocks per SM.
    const int64_t kmax = int64_t{kGemvSmemBudget} * 32 / (int64_t{mt} * 4 * 33) / kGemvStepK * kGemvStepK;
    const int64_t want = std::min(cdiv(4 * int64_t{sms}, col_blocks), std::max<int64_t>(1, K / 1024));
    const int64_t ksplit = std::max(cdiv(K, kmax), want);
    plan.gemv_kslice = static_cast<int>(cdiv(cdiv(K, ksplit), kGemvStepK) * kGemvStepK);
    plan.gemv_ksplit = static_cast<int>(cdiv(K, plan.gemv_kslice));
    if (plan.gemv_ksplit > 65535)  // grid.y
      return fn + "K=" + std::to_string(K) + " is too long for the GEMV (" + std::to_string(M) + " rows)";
  } else {
    plan.gemm_bm = cdiv(M, 128) * cdiv(N, kGemmBN) >= sms ? 128 : 64;
  }
  // Prologue: rows of x it reads, and K slices for about 2 blocks per SM (each slice >= 512 k).
  plan.pro_rows = plan.gemv || R > 0 ? static_cast<int>(M) : 0;
  const int64_t row_tiles = plan.pro_rows > 0 ? cdiv(plan.pro_rows, kProRows) : 1;
  const int64_t rank_tiles = R > 0 ? cdiv(R, kProRankTile) : 1;
  const int64_t slices = std::clamp(cdiv(2 * int64_t{sms}, row_tiles * rank_tiles), int64_t{1}, cdiv(K, 512));
  plan.pro_kslice = static_cast<int>(cdiv(cdiv(K, slices), kProChunk) * kProChunk);
  plan.pro_kslices = static_cast<int>(cdiv(K, plan.pro_kslice));

  // Workspace: counters, then float32 regions, each 16-byte aligned.
  const bool lora_split = R > 0 && plan.pro_kslices > 1;
  plan.pro_counters = lora_split ? row_tiles * rank_tiles : 0;
  plan.counters = plan.pro_counters + (plan.gemv && plan.gemv_ksplit > 1 ? col_blocks : 0);
  int64_t off = cdiv(plan.counters * 4, 16) * 16;
  auto take = [&](int64_t floats) {
    const int64_t at = off;
    off += cdiv(floats * 4, 16) * 16;
    return at;
  };
  if (R > 0) plan.lora_act_off = take(M * R);
  if (lora_split) plan.lora_part_off = take(plan.pro_kslices * M * R);
  if (plan.gemv) {
    plan.xhat_off = take(M * K);
    plan.xsum_off = take(M * (K / 32));
    if (plan.gemv_ksplit > 1) plan.partial_off = take(plan.gemv_ksplit * M * N);
  } else {
    plan.inv_smooth_off = take(K);
  }
  plan.bytes = off;
  *out = plan;
  return "";
}

std::string linear_w4a16(const W4A16Args& a, W4A16Path path, int sms, int device, uintptr_t stream) {
  using namespace w4a16;
  const std::string fn = "linear_w4a16 (CUDA): ";
  if (a.dtype != 1 && a.dtype != 2)
    return fn + "dtype must be 1 (bfloat16) or 2 (float16), got " + std::to_string(a.dtype);
  W4A16Plan plan;
  std::string err = plan_w4a16(a.M, a.N, a.K, a.R, path, sms, &plan);
  if (!err.empty()) return err;
  if (a.M == 0 || a.N == 0) return "";
  int cc = 0;
  err = use_device(device, &cc);
  if (!err.empty()) return fn + err;
  if (cc < 80)
    return fn + "needs compute capability 8.0 or newer, device " + std::to_string(device) + " has " +
           std::to_string(cc / 10) + "." + std::to_string(cc % 10);

  uint8_t* ws = static_cast<uint8_t*>(a.workspace);
  auto region = [&](int64_t off) { return off < 0 ? nullptr : reinterpret_cast<float*>(ws + off); };
  Params p{};
  p.x = a.x, p.qweight = a.qweight, p.smooth = a.smooth, p.lora_down = a.lora_down, p.lora_up = a.lora_up;
  p.wscales = static_cast<const uint16_t*>(a.wscales), p.wmins = static_cast<const uint16_t*>(a.wmins);
  p.bias = a.bias, p.y = a.y;
  p.counters = reinterpret_cast<int*>(ws), p.gemv_counters = p.counters + plan.pro_counters;
  p.xhat = region(plan.xhat_off), p.xsum = region(plan.xsum_off), p.inv_smooth = region(plan.inv_smooth_off);
  p.lora_act = region(plan.lora_act_off), p.lora_part = region(plan.lora_part_off);
  p.partial = region(plan.partial_off);
  p.M = static_cast<int>(a.M), p.N = static_cast<int>(a.N), p.K = static_cast<int>(a.K), p.R = static_cast<int>(a.R);

  const auto s = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t e = cudaSuccess;
  if (plan.counters > 0) e = cudaMemsetAsync(ws, 0, static_cast<size_t>(plan.counters) * 4, s);
  if (e == cudaSuccess)
    e = a.dtype == 1 ? run<__nv_bfloat16>(p, plan, device, s) : run<__half>(p, plan, device, s);
  if (e != cudaSuccess) return cuda_error("linear_w4a16 (CUDA) kernel", e);
  return "";
}

}  // namespace svdq::cuda
