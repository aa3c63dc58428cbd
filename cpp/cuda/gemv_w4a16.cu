// linear_w4a16 on CUDA, part 1: the prologue (both paths) and the small-M GEMV.
//
// Prologue (grid: K slices x 32-row tiles x 32-rank tiles; 256 threads). Per chunk of 128 k, each thread
// smooths 8 consecutive elements of two rows, x̂ = x / smooth with IEEE division (__fdiv_rn: x̂ is the
// reference's bit for bit), and writes what the path needs: x̂ itself and its sums over each 32 consecutive
// k (GEMV), 1 / smooth (GEMM). The block then multiplies its x̂ chunk by lora_down's rows in float32 (warp w:
// rows 4w..4w+3, lane = rank), as quantize_act does. K slices > 1 write partial sums; the last slice block to
// arrive adds them up in slice order (deterministic) into lora_act.
//
// GEMV (M <= 16 rows, MT = M rounded up to a power of two; grid: N / 32 x K slices; 128 threads). The block
// copies x̂ and the 32-k sums of its K slice into shared memory (cp.async), then each warp streams 8 columns'
// codes: lane = (column lane cl = lane / 8, k lane kl = lane % 8); per step of 256 k, k lane kl takes k
// 32 kl .. 32 kl + 31 of its 2 columns with one 16-byte load each (8 k lanes: 128 contiguous bytes of a row).
// x̂ is stored permuted in each 256-k block (float4 i of k lane j at 32 i + 4 j), so the 8 k lanes read 128
// contiguous bytes (conflict-free) and the 4 column lanes read the same addresses (broadcast).
// Per 32 k and column: t = x̂ · q (exact float codes, nibbles_to_float), then
//   acc += s · t + m · Σx̂          (per group: W = q · s + m; two FMAs per 32 k, not one per weight)
// A ring of 4 (2 for MT >= 8) steps of codes and scales per lane stays in flight. A 3-step xor shuffle sums
// the 8 k lanes.
// One K slice: the epilogue adds lora_act · lora_up and bias and stores; more: partial sums, and the last
// block of a column tile to arrive sums the slices in order and does the epilogue.
#include "w4a16.cuh"

namespace svdq::cuda::w4a16 {
namespace {

constexpr int kProThreads = 256;
constexpr int kProStride = kProChunk + 4;  // float4-aligned rows

template <typename T>
__global__ void __launch_bounds__(kProThreads) prologue_kernel(const Params p, const int rows, const int kslice) {
  __shared__ __align__(16) float xs_s[kProRows][kProStride];
  __shared__ __align__(16) float ld_s[kProChunk][kProRankTile];
  const T* x = static_cast<const T*>(p.x);
  const T* smooth = static_cast<const T*>(p.smooth);
  const T* lora_down = static_cast<const T*>(p.lora_down);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = tid & 15;   // 8-element segment of the chunk
  const int row0 = tid >> 4;  // this thread smooths rows row0 and row0 + 16
  const int m0 = blockIdx.y * kProRows, r0 = blockIdx.z * kProRankTile;
  const int rc = min(kProRankTile, p.R - r0);  // <= 0 when R == 0
  const int k_begin = blockIdx.x * kslice, k_end = min(p.K, k_begin + kslice);
  const bool first_rank_tile = blockIdx.z == 0;  // x̂, its sums and 1 / smooth are written once
  float acc[4] = {0.f, 0.f, 0.f, 0.f};

  for (int k0 = k_begin; k0 < k_end; k0 += kProChunk) {
    const int k = k0 + seg * 8;
    const bool k_ok = k < k_end;  // slices are whole groups, so a segment is all in or all out
    if (p.inv_smooth != nullptr && blockIdx.y == 0 && first_rank_tile && row0 == 0 && k_ok) {
      float sm[8];
      load8(smooth + k, sm);
      float4* dst = reinterpret_cast<float4*>(p.inv_smooth + k);
      dst[0] = make_float4(__frcp_rn(sm[0]), __frcp_rn(sm[1]), __frcp_rn(sm[2]), __frcp_rn(sm[3]));
      dst[1] = make_float4(__frcp_rn(sm[4]), __frcp_rn(sm[5]), __frcp_rn(sm[6]), __frcp_rn(sm[7]));
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = row0 + h * 16, m = m0 + row;
      float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
      if (m < rows && k_ok) {
        float sm[8];
        load8(x + static_cast<size_t>(m) * p.K + k, v);
        load8(smooth + k, sm);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __fdiv_rn(v[j], sm[j]);
        if (p.xhat != nullptr && first_rank_tile) {
          float4* dst = reinterpret_cast<float4*>(p.xhat + static_cast<size_t>(m) * p.K + k);
          dst[0] = make_float4(v[0], v[1], v[2], v[3]);
          dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
      }
      // Sum over 32 consecutive k: segments 4i..4i+3 are 4 adjacent lanes (every lane takes part).
      float s = ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
      s += __shfl_xor_sync(0xffffffffu, s, 1);
      s += __shfl_xor_sync(0xffffffffu, s, 2);
      if (p.xsum != nullptr && first_rank_tile && m < rows && k_ok && (seg & 3) == 0)
        p.xsum[static_cast<size_t>(m) * (p.K / 32) + k / 32] = s;
      float4* dst = reinterpret_cast<float4*>(&xs_s[row][seg * 8]);
      dst[0] = make_float4(v[0], v[1], v[2], v[3]);
      dst[1] = make_float4(v[4], v[5], v[6], v[7]);
    }
    if (rc > 0) {
      for (int i = tid; i < kProChunk * kProRankTile; i += kProThreads) {
        const int kk = i / kProRankTile, rr = i % kProRankTile;
        ld_s[kk][rr] = (rr < rc && k0 + kk < k_end)
                           ? Convert<T>::to_float(lora_down[static_cast<size_t>(k0 + kk) * p.R + r0 + rr])
                           : 0.f;
      }
    }
    __syncthreads();
    if (rc > 0) {
      // Columns past the slice are zero in both operands, so the loop runs the full chunk.
#pragma unroll 4
      for (int kk = 0; kk < kProChunk; kk += 4) {
        float4 xv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = *reinterpret_cast<const float4*>(&xs_s[warp * 4 + i][kk]);
        const float l0 = ld_s[kk][lane], l1 = ld_s[kk + 1][lane], l2 = ld_s[kk + 2][lane],
                    l3 = ld_s[kk + 3][lane];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          acc[i] = fmaf(xv[i].x, l0, acc[i]);
          acc[i] = fmaf(xv[i].y, l1, acc[i]);
          acc[i] = fmaf(xv[i].z, l2, acc[i]);
          acc[i] = fmaf(xv[i].w, l3, acc[i]);
        }
      }
    }
    __syncthreads();
  }

  if (rc <= 0) return;  // uniform over the block
  float* out = gridDim.x == 1 ? p.lora_act : p.lora_part + static_cast<size_t>(blockIdx.x) * p.M * p.R;
  if (lane < rc) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int m = m0 + warp * 4 + i;
      if (m < rows) out[static_cast<size_t>(m) * p.R + r0 + lane] = acc[i];
    }
  }
  if (gridDim.x == 1 || !last_to_arrive(p.counters + blockIdx.y * gridDim.z + blockIdx.z, gridDim.x)) return;
  for (int i = tid; i < kProRows * kProRankTile; i += kProThreads) {
    const int m = m0 + i / kProRankTile, rr = i % kProRankTile;
    if (m >= rows || rr >= rc) continue;
    float v = 0.f;
    for (int s = 0; s < static_cast<int>(gridDim.x); ++s)
      v += __ldcg(p.lora_part + (static_cast<size_t>(s) * p.M + m) * p.R + r0 + rr);
    p.lora_act[static_cast<size_t>(m) * p.R + r0 + rr] = v;
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// Up to 4 rows: 4 resident blocks (16 warps, 128 registers) to keep enough loads in flight; the 8- and
// 16-row variants are FMA-bound and keep their accumulators in registers instead.
template <typename T, int MT>
__global__ void __launch_bounds__(kGemvThreads, MT <= 4 ? 4 : 2) gemv_kernel(const Params p, const int kslice) {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800)
  constexpr int C = kGemvColsPerLane;
  constexpr int U = MT >= 8 ? 2 : 4;   // steps of codes and scales loaded ahead
  constexpr int NT = MT <= 4 ? 2 : 1;  // independent FMA chains per (column, row)
  extern __shared__ __align__(16) float gemv_smem[];
  float* xh_s = gemv_smem;               // [MT][kslice], permuted per 256 k
  float* xs_s = gemv_smem + MT * kslice;  // [MT][kslice / 32]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, kl = lane & 7, cl = lane >> 3;
  const int kb0 = blockIdx.y * kslice, klen = min(p.K - kb0, kslice);
  const int nq = kslice / 32, nf = kslice / 4;

  // x̂ and its sums for this K slice (rows past M and k past the slice: zeros).
  for (int i = tid; i < MT * nf; i += kGemvThreads) {
    const int mm = i / nf, kk = (i % nf) * 4;
    const bool ok = mm < p.M && kk < klen;
    const float* src = p.xhat + (ok ? static_cast<size_t>(mm) * p.K + kb0 + kk : 0);
    const int dst = mm * kslice + (kk & ~255) + ((kk >> 2) & 7) * 32 + ((kk >> 5) & 7) * 4;
    cp_async16(smem_addr(xh_s + dst), src, ok);
  }
  for (int i = tid; i < MT * nq; i += kGemvThreads) {
    const int mm = i / nq, j = i % nq;
    const bool ok = mm < p.M && j * 32 < klen;
    cp_async4(smem_addr(xs_s + i), p.xsum + (ok ? static_cast<size_t>(mm) * (p.K / 32) + kb0 / 32 + j : 0), ok);
  }
  cp_async_commit();

  // This lane's columns; those past N read row N - 1 and are never stored.
  const int n_first = blockIdx.x * kGemvColsPerBlock + warp * (4 * C) + cl * C;
  const int groups = p.K / kGroupSize;
  const uint8_t* wrow[C];
  const uint16_t* srow[C];
  const uint16_t* mrow[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int n = min(n_first + c, p.N - 1);
    wrow[c] = p.qweight + static_cast<size_t>(n) * (p.K / 2) + kb0 / 2;
    srow[c] = p.wscales + static_cast<size_t>(n) * groups + kb0 / kGroupSize;
    mrow[c] = p.wmins + static_cast<size_t>(n) * groups + kb0 / kGroupSize;
  }
  const int nsteps = (klen + kGemvStepK - 1) / kGemvStepK;

  // A ring of U steps of codes and scales per lane: slot u holds step s0 + u and is refilled with step
  // s0 + u + U right after use, so U steps stay in flight.
  uint4 wv[U][C] = {};
  uint16_t sv[U][C] = {}, mv[U][C] = {};
  auto load = [&](int s, int u) {
    const int kk = s * kGemvStepK + kl * 32;
    if (kk < klen) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        wv[u][c] = __ldg(reinterpret_cast<const uint4*>(wrow[c] + kk / 2));
        sv[u][c] = __ldg(srow[c] + kk / kGroupSize);
        mv[u][c] = __ldg(mrow[c] + kk / kGroupSize);
      }
    }
  };

  float acc[C][MT];
#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) acc[c][mm] = 0.f;
#pragma unroll
  for (int u = 0; u < U; ++u) load(u, u);
  cp_async_wait<0>();
  __syncthreads();

  for (int s0 = 0; s0 < nsteps; s0 += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int s = s0 + u;
      if (s * kGemvStepK + kl * 32 >= klen) continue;  // past the slice (the rest of the ring is too)
      float t[C][MT][NT];
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int mm = 0; mm < MT; ++mm)
#pragma unroll
          for (int i = 0; i < NT; ++i) t[c][mm][i] = 0.f;
      const float* xrow = xh_s + s * kGemvStepK + kl * 4;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float q[C][8];
#pragma unroll
        for (int c = 0; c < C; ++c) nibbles_to_float(word(wv[u][c], j), q[c]);
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) {
          const float4 xa = *reinterpret_cast<const float4*>(xrow + mm * kslice + (2 * j) * 32);
          const float4 xb = *reinterpret_cast<const float4*>(xrow + mm * kslice + (2 * j + 1) * 32);
#pragma unroll
          for (int c = 0; c < C; ++c) {
            float& ta = t[c][mm][0];
            float& tb = t[c][mm][NT - 1];
            ta = fmaf(xa.x, q[c][0], ta);
            tb = fmaf(xb.x, q[c][4], tb);
            ta = fmaf(xa.y, q[c][1], ta);
            tb = fmaf(xb.y, q[c][5], tb);
            ta = fmaf(xa.z, q[c][2], ta);
            tb = fmaf(xb.z, q[c][6], tb);
            ta = fmaf(xa.w, q[c][3], ta);
            tb = fmaf(xb.w, q[c][7], tb);
          }
        }
      }
      float sc[C], mn[C];
#pragma unroll
      for (int c = 0; c < C; ++c) sc[c] = bits_to_float<T>(sv[u][c]), mn[c] = bits_to_float<T>(mv[u][c]);
      load(s + U, u);
#pragma unroll
      for (int c = 0; c < C; ++c)
#pragma unroll
        for (int mm = 0; mm < MT; ++mm) {
          const float tt = NT == 2 ? t[c][mm][0] + t[c][mm][NT - 1] : t[c][mm][0];
          acc[c][mm] = fmaf(sc[c], tt, fmaf(mn[c], xs_s[mm * nq + s * 8 + kl], acc[c][mm]));
        }
    }
  }

#pragma unroll
  for (int c = 0; c < C; ++c)
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      float v = acc[c][mm];
      v += __shfl_xor_sync(0xffffffffu, v, 1);
      v += __shfl_xor_sync(0xffffffffu, v, 2);
      v += __shfl_xor_sync(0xffffffffu, v, 4);
      acc[c][mm] = v;  // every k lane holds the sums; k lane kl stores rows kl, kl + 8
    }

  T* y = static_cast<T*>(p.y);
  const bool split = gridDim.y > 1;
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int n = n_first + c;
    if (n >= p.N) continue;
#pragma unroll
    for (int mm = 0; mm < MT; ++mm) {
      if (mm >= p.M || (mm & 7) != kl) continue;
      if (split)
        p.partial[(static_cast<size_t>(blockIdx.y) * p.M + mm) * p.N + n] = acc[c][mm];
      else
        y[static_cast<size_t>(mm) * p.N + n] =
            Convert<T>::from_float(acc[c][mm] + lora_term<T>(p, mm, n) + bias_term<T>(p, n));
    }
  }
  if (!split || !last_to_arrive(p.gemv_counters + blockIdx.x, gridDim.y)) return;
  for (int i = tid; i < kGemvColsPerBlock * p.M; i += kGemvThreads) {
    const int n = blockIdx.x * kGemvColsPerBlock + i % kGemvColsPerBlock, mm = i / kGemvColsPerBlock;
    if (n >= p.N) continue;
    float v = 0.f;
    for (int s = 0; s < static_cast<int>(gridDim.y); ++s)
      v += __ldcg(p.partial + (static_cast<size_t>(s) * p.M + mm) * p.N + n);
    y[static_cast<size_t>(mm) * p.N + n] = Convert<T>::from_float(v + lora_term<T>(p, mm, n) + bias_term<T>(p, n));
  }
#else
  __trap();
#endif
}

template <typename T, int MT>
cudaError_t gemv(const Params& p, const W4A16Plan& plan, cudaStream_t stream) {
  const int kslice = plan.gemv_kslice;
  const size_t smem = static_cast<size_t>(MT) * (kslice + kslice / 32) * sizeof(float);
  const dim3 grid((p.N + kGemvColsPerBlock - 1) / kGemvColsPerBlock, plan.gemv_ksplit);
  gemv_kernel<T, MT><<<grid, kGemvThreads, smem, stream>>>(p, kslice);
  return finish_launch(stream);
}

}  // namespace

template <typename T>
cudaError_t launch_prologue(const Params& p, const W4A16Plan& plan, cudaStream_t stream) {
  const int row_tiles = plan.pro_rows > 0 ? (plan.pro_rows + kProRows - 1) / kProRows : 1;
  const int rank_tiles = p.R > 0 ? (p.R + kProRankTile - 1) / kProRankTile : 1;
  const dim3 grid(plan.pro_kslices, row_tiles, rank_tiles);
  prologue_kernel<T><<<grid, kProThreads, 0, stream>>>(p, plan.pro_rows, plan.pro_kslice);
  return finish_launch(stream);
}

template <typename T>
cudaError_t launch_gemv(const Params& p, const W4A16Plan& plan, cudaStream_t stream) {
  switch (plan.gemv_rows) {
    case 1:
      return gemv<T, 1>(p, plan, stream);
    case 2:
      return gemv<T, 2>(p, plan, stream);
    case 4:
      return gemv<T, 4>(p, plan, stream);
    case 8:
      return gemv<T, 8>(p, plan, stream);
    default:
      return gemv<T, 16>(p, plan, stream);
  }
}

template cudaError_t launch_prologue<__nv_bfloat16>(const Params&, const W4A16Plan&, cudaStream_t);
template cudaError_t launch_prologue<__half>(const Params&, const W4A16Plan&, cudaStream_t);
template cudaError_t launch_gemv<__nv_bfloat16>(const Params&, const W4A16Plan&, cudaStream_t);
template cudaError_t launch_gemv<__half>(const Params&, const W4A16Plan&, cudaStream_t);

}  // namespace svdq::cuda::w4a16
