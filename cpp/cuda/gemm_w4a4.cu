// W4A4 GEMM on tensor cores with the low-rank + bias epilogue.
//
//   y[m, n] = sum_g s_x[m,g] s_w[n,g] (q_x[m,g,:] . q_w[n,g,:]) + lora_act[m] . lora_up[n] + bias[n]
//
// Tiling: a 256-thread block computes 128 x 128 outputs; 8 warps as 4 (M) x 2 (N), 32 x 64 each.
// K advances one 64-group per pipeline stage (4 stages of cp.async). Per group and warp: the
// integer products of 2 x 8 m16n8 tiles land in fresh int32 registers, which are converted and
// scaled by s_x[m] * s_w[n] into float32 accumulators (the group scales differ per group, so the
// integer sums cannot run across groups).
//
// Operands, per stage:
//   A (activations, canonical uint8 [M, K/2]): 128 rows x 32 bytes copied with cp.async, the two
//     16-byte halves of a row swapped on rows 4-7 mod 8 so that ldmatrix reads 8 rows without bank
//     conflicts. An ldmatrix.x4 of an m16 tile gives exactly the m16n8k64 .s4 A fragment: the PTX
//     layout gives lane (g = lane/4, t = lane%4) rows g and g+8, k = 8t..8t+7 and 32+8t..32+8t+7,
//     which are 4 contiguous bytes of the canonical row each (element 2j in the low nibble = the
//     mma's element order).
//   B (weights, ops.pack_mma_weights): for each 64 columns and group, 2048 bytes ordered so that
//     lane l's 16-byte word i holds the B fragments {b0, b1} of n8 tiles 2i and 2i+1 (column g,
//     k = 8t..8t+7 and 32+8t..), i.e. four conflict-free 128-bit shared loads per group.
//   s_x (4 bytes per row) and s_w (float32 [K/64, Np], 16-byte copies).
//
// Two instruction paths, one kernel body:
//   kS4 (sm_80/86/89): mma.sync.m16n8k64.row.col.s32.s4.s4.s32 straight on those fragments.
//   kS8 (sm_90: no 4-bit tensor cores): each 32-bit register of 8 nibbles becomes two registers of
//     4 signed bytes, E = (r << 4) & 0xF0F0F0F0 (elements 0,2,4,6) and O = r & 0xF0F0F0F0
//     (elements 1,3,5,7), each byte 16 x the code, no sign-extension step needed. Fed to
//     mma.sync.m16n8k32 s8 as A = {E(a0), E(a1), O(a0), O(a1)}, B = {E(b0), O(b0)} (then the same
//     with a2, a3, b1), mma position k' = 4t+j holds k = 8t+2j and k' = 16+4t+j holds k = 8t+2j+1
//     in both operands: the k order is permuted identically in A and B, so the dot product is
//     unchanged. The result is 256 x the s4 one; the int -> float conversion divides by 256 for free
//     (and exactly: small_int_to_float_div256).
//
// Tails: rows past M are zero-filled by cp.async and never stored; the packed weights are padded
// to a multiple of 128 columns with zero codes and scales; K is a whole number of groups.
#include <algorithm>

#include "common.cuh"

namespace svdq::cuda {
namespace {

constexpr int kBM = 128, kBN = kTileN, kStages = 4, kThreads = 256;
constexpr int kABytes = kBM * kGroupSize / 2;  // 4096
constexpr int kBBytes = kBN * kGroupSize / 2;  // 4096
constexpr int kStageBytes = kABytes + kBBytes + (kBM + kBN) * 4;
constexpr int kSmemBytes = kStages * kStageBytes;  // 36864: static shared memory, no opt-in needed
constexpr int kRankTile = 32;
// Two resident blocks (16 warps) per SM to hide the per-group scaling's latency: caps registers at
// 128, which both paths meet without spills (the s8 path would otherwise take 171).
constexpr int kMinBlocksPerSm = 2;
constexpr int kLoraActStride = kBM + 1;  // the transposing store below is then conflict-free
static_assert(kRankTile * (kLoraActStride + kBN) * 4 <= kSmemBytes, "epilogue tiles must fit the pipeline");
static_assert(kBN == 2 * 64, "two 64-column weight panels per block");

struct Params {
  const uint8_t* q_x;
  const float* s_x;
  const float* lora_act;
  const uint8_t* wq;
  const float* sw;
  const float* lora_up;
  const float* bias;
  void* y;
  int M, N, Np, K, R;
};

__device__ __forceinline__ void mma_s4(int (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "r"(0), "r"(0), "r"(0), "r"(0));
}

__device__ __forceinline__ void mma_s8(int (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                       uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// d / 256, exact for |d| < 2^22 (|d| <= 2^20 here): in [2^15, 2^16) a float's ulp is 2^-8, so the
// integer added to the mantissa of 1.5 * 2^15 lands in units of 1/256.
__device__ __forceinline__ float small_int_to_float_div256(int d) {
  return __int_as_float(d + 0x47400000) - 49152.0f;
}

__device__ __forceinline__ uint32_t even_x16(uint32_t r) { return (r << 4) & 0xF0F0F0F0u; }
__device__ __forceinline__ uint32_t odd_x16(uint32_t r) { return r & 0xF0F0F0F0u; }

template <bool kS8, typename OutT>
__device__ __forceinline__ void gemm_body(const Params& p, uint8_t* smem) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp & 3, wn = warp >> 2;
  const int gid = lane >> 2, tig = lane & 3;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int groups = p.K / kGroupSize;
  const size_t row_bytes = static_cast<size_t>(p.K) / 2;
  const uint32_t smem0 = smem_addr(smem);

  auto load_stage = [&](int g, int stage) {
    const uint32_t st = smem0 + stage * kStageBytes;
    {  // A: one 16-byte half-row per thread
      const int row = tid >> 1, half = tid & 1, m = m0 + row;
      const bool ok = m < p.M;
      const uint8_t* src = p.q_x + (ok ? m : 0) * row_bytes + g * 32 + half * 16;
      cp_async16(st + row * 32 + ((half ^ ((row >> 2) & 1)) << 4), src, ok);
    }
    {  // B: two 2048-byte panels
      const int panel = tid >> 7, i = tid & 127;
      const uint8_t* src =
          p.wq + (static_cast<size_t>((n0 >> 6) + panel) * groups + g) * kPanelBytes + i * 16;
      cp_async16(st + kABytes + panel * kPanelBytes + i * 16, src, true);
    }
    if (tid < kBM) {
      const int m = m0 + tid;
      const bool ok = m < p.M;
      cp_async4(st + kABytes + kBBytes + tid * 4, p.s_x + static_cast<size_t>(ok ? m : 0) * groups + g, ok);
    } else if (tid < kBM + kBN / 4) {
      const int i = tid - kBM;
      cp_async16(st + kABytes + kBBytes + kBM * 4 + i * 16, p.sw + static_cast<size_t>(g) * p.Np + n0 + i * 4,
                 true);
    }
  };

  float acc[2][8][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int nj = 0; nj < 8; ++nj)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][nj][c] = 0.f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < groups) load_stage(s, s);
    cp_async_commit();  // empty groups keep the wait count uniform
  }

  // ldmatrix.x4 address of this lane: matrix lane/8 = (rows +8 if odd, k half if >= 2), row lane%8.
  const int a_row = wm * 32 + ((lane >> 3) & 1) * 8 + (lane & 7), a_half = lane >> 4;

  for (int g = 0; g < groups; ++g) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage g visible to all; everyone is done with the stage refilled next
    if (g + kStages - 1 < groups) load_stage(g + kStages - 1, (g + kStages - 1) % kStages);
    cp_async_commit();

    const int stage = g % kStages;
    const uint32_t st = smem0 + stage * kStageBytes;
    const uint8_t* stp = smem + stage * kStageBytes;

    uint32_t a[2][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
      const int row = a_row + mi * 16;
      ldmatrix_x4(a[mi], st + row * 32 + ((a_half ^ ((row >> 2) & 1)) << 4));
    }
    uint32_t b[8][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const uint4 v =
          *reinterpret_cast<const uint4*>(stp + kABytes + wn * kPanelBytes + (i * 32 + lane) * 16);
      b[2 * i][0] = v.x, b[2 * i][1] = v.y, b[2 * i + 1][0] = v.z, b[2 * i + 1][1] = v.w;
    }
    const float* sxs = reinterpret_cast<const float*>(stp + kABytes + kBBytes);
    const float* sws = sxs + kBM;
    float sx[2][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sx[mi][h] = sxs[wm * 32 + mi * 16 + h * 8 + gid];
      }

    if constexpr (kS8) {
      uint32_t ae[2][2][4];  // [mi][k half][register]
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int kh = 0; kh < 2; ++kh) {
          ae[mi][kh][0] = even_x16(a[mi][2 * kh]);
          ae[mi][kh][1] = even_x16(a[mi][2 * kh + 1]);
          ae[mi][kh][2] = odd_x16(a[mi][2 * kh]);
          ae[mi][kh][3] = odd_x16(a[mi][2 * kh + 1]);
        }
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const float2 sw = *reinterpret_cast<const float2*>(sws + wn * 64 + nj * 8 + tig * 2);
        const uint32_t be0 = even_x16(b[nj][0]), bo0 = odd_x16(b[nj][0]);
        const uint32_t be1 = even_x16(b[nj][1]), bo1 = odd_x16(b[nj][1]);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          int d[4] = {0, 0, 0, 0};
          mma_s8(d, ae[mi][0][0], ae[mi][0][1], ae[mi][0][2], ae[mi][0][3], be0, bo0);
          mma_s8(d, ae[mi][1][0], ae[mi][1][1], ae[mi][1][2], ae[mi][1][3], be1, bo1);
          acc[mi][nj][0] = fmaf(small_int_to_float_div256(d[0]), sx[mi][0] * sw.x, acc[mi][nj][0]);
          acc[mi][nj][1] = fmaf(small_int_to_float_div256(d[1]), sx[mi][0] * sw.y, acc[mi][nj][1]);
          acc[mi][nj][2] = fmaf(small_int_to_float_div256(d[2]), sx[mi][1] * sw.x, acc[mi][nj][2]);
          acc[mi][nj][3] = fmaf(small_int_to_float_div256(d[3]), sx[mi][1] * sw.y, acc[mi][nj][3]);
        }
      }
    } else {
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const float2 sw = *reinterpret_cast<const float2*>(sws + wn * 64 + nj * 8 + tig * 2);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          int d[4];
          mma_s4(d, a[mi], b[nj][0], b[nj][1]);
          acc[mi][nj][0] = fmaf(small_int_to_float(d[0]), sx[mi][0] * sw.x, acc[mi][nj][0]);
          acc[mi][nj][1] = fmaf(small_int_to_float(d[1]), sx[mi][0] * sw.y, acc[mi][nj][1]);
          acc[mi][nj][2] = fmaf(small_int_to_float(d[2]), sx[mi][1] * sw.x, acc[mi][nj][2]);
          acc[mi][nj][3] = fmaf(small_int_to_float(d[3]), sx[mi][1] * sw.y, acc[mi][nj][3]);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline's shared memory is reused below

  // Low-rank epilogue in float32 (lora_act is float32 and the branch carries the weight's largest
  // singular directions, so 16-bit tensor cores would cost visible accuracy): 32 ranks at a time,
  // lora_act transposed to [rank][row] and lora_up as [rank][column] in shared memory.
  float* la_s = reinterpret_cast<float*>(smem);
  float* lu_s = la_s + kRankTile * kLoraActStride;
  for (int r0 = 0; r0 < p.R; r0 += kRankTile) {
    const int rc = min(kRankTile, p.R - r0);
    for (int i = tid; i < kRankTile * kBM; i += kThreads) {
      const int rr = i % kRankTile, row = i / kRankTile, m = m0 + row;
      la_s[rr * kLoraActStride + row] =
          (m < p.M && rr < rc) ? p.lora_act[static_cast<size_t>(m) * p.R + r0 + rr] : 0.f;
    }
    for (int i = tid; i < kRankTile * kBN; i += kThreads) {
      const int rr = i / kBN, col = i % kBN;
      lu_s[rr * kBN + col] = rr < rc ? p.lora_up[static_cast<size_t>(r0 + rr) * p.Np + n0 + col] : 0.f;
    }
    __syncthreads();
    for (int rr = 0; rr < rc; ++rr) {
      float la[2][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) la[mi][h] = la_s[rr * kLoraActStride + wm * 32 + mi * 16 + h * 8 + gid];
#pragma unroll
      for (int nj = 0; nj < 8; ++nj) {
        const float2 lu = *reinterpret_cast<const float2*>(lu_s + rr * kBN + wn * 64 + nj * 8 + tig * 2);
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
          acc[mi][nj][0] = fmaf(la[mi][0], lu.x, acc[mi][nj][0]);
          acc[mi][nj][1] = fmaf(la[mi][0], lu.y, acc[mi][nj][1]);
          acc[mi][nj][2] = fmaf(la[mi][1], lu.x, acc[mi][nj][2]);
          acc[mi][nj][3] = fmaf(la[mi][1], lu.y, acc[mi][nj][3]);
        }
      }
    }
    __syncthreads();
  }

  OutT* y = static_cast<OutT*>(p.y);
  const bool even_n = (p.N & 1) == 0;  // then (row * N + col) is even and a pair store is aligned
#pragma unroll
  for (int nj = 0; nj < 8; ++nj) {
    const int col = n0 + wn * 64 + nj * 8 + tig * 2;
    if (col >= p.N) continue;
    float b0 = 0.f, b1 = 0.f;
    if (p.bias != nullptr) b0 = p.bias[col], b1 = p.bias[col + 1];  // padded to Np: col + 1 is in bounds
    const bool both = col + 1 < p.N;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int m = m0 + wm * 32 + mi * 16 + h * 8 + gid;
        if (m < p.M)
          store_pair(y + static_cast<size_t>(m) * p.N + col, acc[mi][nj][2 * h] + b0,
                     acc[mi][nj][2 * h + 1] + b1, both, both && even_n);
      }
  }
}

// kS8 selects the int8 path. The guards keep each cubin to the path that runs on it (sm_90 has no
// s4 body at all); the host never launches a path on an architecture that lacks it.
template <bool kS8, typename OutT>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gemm_w4a4_kernel(const Params p) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  __shared__ __align__(128) uint8_t smem[kSmemBytes];
  if constexpr (kS8 || __CUDA_ARCH__ < 900) {
    gemm_body<kS8, OutT>(p, smem);
  } else {
    __trap();
  }
#else
  __trap();
#endif
}

template <bool kS8>
cudaError_t launch(const Params& p, int out_dtype, cudaStream_t stream) {
  const dim3 grid(p.Np / kBN, (p.M + kBM - 1) / kBM);
  switch (out_dtype) {
    case 0:
      gemm_w4a4_kernel<kS8, float><<<grid, kThreads, 0, stream>>>(p);
      break;
    case 1:
      gemm_w4a4_kernel<kS8, __nv_bfloat16><<<grid, kThreads, 0, stream>>>(p);
      break;
    default:
      gemm_w4a4_kernel<kS8, __half><<<grid, kThreads, 0, stream>>>(p);
      break;
  }
  return finish_launch(stream);
}

}  // namespace

const char* auto_mma_path(int cc) {
  if (cc < 80) return "";
  return cc < 90 ? "s4" : "s8";
}

std::string gemm_w4a4(const GemmArgs& a, MmaPath path, int device, uintptr_t stream) {
  const char* fn = "gemm_w4a4 (CUDA): ";
  if (a.M <= 0 || a.N <= 0) return "";
  const int64_t np = (a.N + kBN - 1) / kBN * kBN;
  if (a.M > INT32_MAX || np > INT32_MAX || a.K > INT32_MAX || a.R > INT32_MAX ||
      (a.M + kBM - 1) / kBM > 65535)
    return std::string(fn) + "sizes too large (M=" + std::to_string(a.M) + ", N=" + std::to_string(a.N) +
           ", K=" + std::to_string(a.K) + ")";
  if (a.out_dtype < 0 || a.out_dtype > 2)
    return std::string(fn) + "unknown dtype code " + std::to_string(a.out_dtype);
  int cc = 0;
  std::string err = use_device(device, &cc);
  if (!err.empty()) return fn + err;
  const std::string cc_str = std::to_string(cc / 10) + "." + std::to_string(cc % 10);
  if (cc < 80)
    return std::string(fn) + "needs compute capability 8.0 or newer, device " + std::to_string(device) +
           " has " + cc_str;
  bool s8 = std::string(auto_mma_path(cc)) == "s8";
  if (path == MmaPath::kS4) {
    if (cc >= 90)
      return std::string(fn) +
             "the s4 mma path needs compute capability 8.x (4-bit tensor cores), device has " + cc_str;
    s8 = false;
  } else if (path == MmaPath::kS8) {
    s8 = true;
  }

  Params p{};
  p.q_x = a.q_x, p.s_x = a.s_x, p.lora_act = a.lora_act, p.wq = a.wq, p.sw = a.sw, p.lora_up = a.lora_up;
  p.bias = a.bias, p.y = a.y;
  p.M = static_cast<int>(a.M), p.N = static_cast<int>(a.N), p.Np = static_cast<int>(np);
  p.K = static_cast<int>(a.K), p.R = static_cast<int>(a.R);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const cudaError_t e = s8 ? launch<true>(p, a.out_dtype, s) : launch<false>(p, a.out_dtype, s);
  if (e != cudaSuccess) return cuda_error("gemm_w4a4 (CUDA) kernel", e);
  return "";
}

std::string device_capability(int device, int* cc) {
  int major = 0, minor = 0;
  cudaError_t e = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return cuda_error(("cannot query CUDA device " + std::to_string(device)).c_str(), e);
  }
  *cc = 10 * major + minor;
  return "";
}

}  // namespace svdq::cuda
