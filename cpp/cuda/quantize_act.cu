// quantize_act on CUDA: one read of x gives the INT4 codes, the group scales and x̂ @ lora_down.
//
// A block owns kRows rows and walks K in chunks of kChunk. Per chunk:
//   1. each thread smooths 8 consecutive elements of a row (8 lanes = one 64-group), the group
//      absmax is a 3-step shuffle, and the thread writes its 4 code bytes; x̂ goes to shared memory;
//   2. the block multiplies the x̂ chunk [kRows, kChunk] by lora_down's rows [kChunk, 32] in float32
//      (warp w owns rows 4w..4w+3, lane = low-rank column), so lora_down is read once per kRows rows
//      rather than once per row.
// Ranks above 32 re-walk K for each further 32 columns (re-reading x, not re-writing the codes):
// the checkpoints this targets use r <= 32.
//
// Bit-exactness with reference.quantize_act: x / smooth, absmax / 7 and x̂ / s are IEEE float32
// divisions (__fdiv_rn, immune to -use_fast_math), rintf rounds half to even, an all-zero group
// gives scale 0 and codes 0. Nothing is contracted into an FMA on that path.
#include <algorithm>

#include "common.cuh"

namespace svdq::cuda {
namespace {

constexpr int kRows = 32;
constexpr int kChunk = 128;  // two groups per row
constexpr int kThreads = 256;
constexpr int kRankTile = 32;
constexpr int kXsStride = kChunk + 4;  // float4-aligned rows

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_act_kernel(const T* __restrict__ x, const T* __restrict__ smooth,
                        const T* __restrict__ lora_down, uint8_t* __restrict__ q_x, float* __restrict__ s_x,
                        float* __restrict__ lora_act, int M, int K, int R) {
  __shared__ __align__(16) float xs_s[kRows][kXsStride];
  __shared__ __align__(16) float ld_s[kChunk][kRankTile];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int seg = tid & 15;   // 8-element segment of the chunk; segments 0-7 and 8-15 are the two groups
  const int row0 = tid >> 4;  // this thread quantizes rows row0 and row0 + 16
  const int m0 = blockIdx.x * kRows;
  const int groups = K / kGroupSize;

  for (int r0 = 0; r0 < R || r0 == 0; r0 += kRankTile) {
    const bool write_codes = r0 == 0;
    const int rc = min(kRankTile, R - r0);  // <= 0 when R == 0
    float acc[4] = {0.f, 0.f, 0.f, 0.f};

    for (int k0 = 0; k0 < K; k0 += kChunk) {
      const int k = k0 + seg * 8;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int row = row0 + h * 16, m = m0 + row;
        float v[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        // k < K is uniform over the 8 lanes of a group, so the shuffles below stay within live lanes' groups.
        if (m < M && k < K) {
          float sm[8];
          load8(x + static_cast<size_t>(m) * K + k, v);
          load8(smooth + k, sm);
#pragma unroll
          for (int j = 0; j < 8; ++j) v[j] = __fdiv_rn(v[j], sm[j]);
        }
        float amax = 0.f;
#pragma unroll
        for (int j = 0; j < 8; ++j) amax = fmaxf(amax, fabsf(v[j]));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 2));
        amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));

        float4* dst = reinterpret_cast<float4*>(&xs_s[row][seg * 8]);
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);

        if (write_codes && m < M && k < K) {
          const float s = __fdiv_rn(amax, 7.0f);
          uint32_t packed = 0;
          if (s != 0.f) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
              const float q = fminf(fmaxf(rintf(__fdiv_rn(v[j], s)), -8.f), 7.f);
              packed |= (static_cast<uint32_t>(static_cast<int>(q)) & 0xFu) << (4 * j);
            }
          }
          *reinterpret_cast<uint32_t*>(q_x + static_cast<size_t>(m) * (K / 2) + k / 2) = packed;
          if ((seg & 7) == 0) s_x[static_cast<size_t>(m) * groups + k / kGroupSize] = s;
        }
      }

      if (rc > 0) {
        for (int i = tid; i < kChunk * kRankTile; i += kThreads) {
          const int kk = i / kRankTile, rr = i % kRankTile;
          ld_s[kk][rr] = (rr < rc && k0 + kk < K)
                             ? Convert<T>::to_float(lora_down[static_cast<size_t>(k0 + kk) * R + r0 + rr])
                             : 0.f;
        }
      }
      __syncthreads();
      if (rc > 0) {
        // Rows past K are zero in both operands, so the loop runs the full chunk.
#pragma unroll 4
        for (int kk = 0; kk < kChunk; kk += 4) {
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

    if (rc > 0 && lane < rc) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + warp * 4 + i;
        if (m < M) lora_act[static_cast<size_t>(m) * R + r0 + lane] = acc[i];
      }
    }
  }
}

template <typename T>
cudaError_t launch(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                   float* lora_act, int M, int K, int R, cudaStream_t stream) {
  const dim3 grid((M + kRows - 1) / kRows);
  quantize_act_kernel<T>
      <<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(smooth),
                                      static_cast<const T*>(lora_down), q_x, s_x, lora_act, M, K, R);
  return finish_launch(stream);
}

}  // namespace

std::string quantize_act(const void* x, const void* smooth, const void* lora_down, uint8_t* q_x, float* s_x,
                         float* lora_act, int64_t M, int64_t K, int64_t R, int dtype, int device,
                         uintptr_t stream) {
  if (M <= 0) return "";
  if (M > INT32_MAX || K > INT32_MAX / 2 || R > INT32_MAX / 2 || M * K > INT64_MAX / 4)
    return "quantize_act (CUDA): sizes too large (M=" + std::to_string(M) + ", K=" + std::to_string(K) +
           ", R=" + std::to_string(R) + ")";
  int cc = 0;
  std::string err = use_device(device, &cc);
  if (!err.empty()) return "quantize_act (CUDA): " + err;
  if (cc < 80)
    return "quantize_act (CUDA): needs compute capability 8.0 or newer, device " + std::to_string(device) +
           " has " + std::to_string(cc / 10) + "." + std::to_string(cc % 10);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int m = static_cast<int>(M), k = static_cast<int>(K), r = static_cast<int>(R);
  cudaError_t e;
  switch (dtype) {
    case 0:
      e = launch<float>(x, smooth, lora_down, q_x, s_x, lora_act, m, k, r, s);
      break;
    case 1:
      e = launch<__nv_bfloat16>(x, smooth, lora_down, q_x, s_x, lora_act, m, k, r, s);
      break;
    case 2:
      e = launch<__half>(x, smooth, lora_down, q_x, s_x, lora_act, m, k, r, s);
      break;
    default:
      return "quantize_act (CUDA): unknown dtype code " + std::to_string(dtype);
  }
  if (e != cudaSuccess) return cuda_error("quantize_act (CUDA) kernel", e);
  return "";
}

}  // namespace svdq::cuda
