// Tile-skipping GEMM for the tile family (TBD): C = alpha * A @ B (+ bias) where a weight tile
// (i, j) of the (out, in) weight takes part iff (i + j - offset) mod dp == 0.
//
// One CTA computes a BM x BN block of C and walks K in BK chunks; a chunk whose weight tiles are
// all dropped for this block is skipped as a whole (a CTA-uniform branch), so with pattern tiles of
// at least BK (the default 32) each output block loops only over its kept K tiles. Elements of a
// chunk that mixes kept and dropped tiles (pattern tile < BK) are masked on load instead.
// fp32 accumulation, operands staged through shared memory as float; a plain-FMA baseline (no
// tensor cores), compile-checked for sm_90, not yet measured on a GPU.
#pragma once

#include <ATen/OpMathType.h>

namespace fxdrop {
namespace cuda {

enum TileMode : int {
  kForward = 0,  // y(M=batch, N=out) = x(batch, in) @ W^T       ; tile row = n, tile col = k
  kGradX = 1,    // gx(M=batch, N=in) = g(batch, out) @ W          ; tile row = k, tile col = n
  kGradW = 2,    // gw(M=out, N=in) = g^T(out, batch) @ x(batch, in) ; tile row = m, tile col = n (no K mask)
};

struct TileArgs {
  int64_t M, N, K;
  int64_t a_sm, a_sk;  // A(m, k) = a[m * a_sm + k * a_sk]
  int64_t b_sk, b_sn;  // B(k, n) = b[k * b_sk + n * b_sn]
  int64_t ldc;         // C row-major (M, N)
  int64_t bias_stride;
  int64_t tile, dp, offset;
  float alpha;
};

// Is some tile (i, j) with i in [i0, i1], j in [j0, j1] kept? The diagonal sums i + j cover
// [i0 + j0, i1 + j1] without gaps, so check for one congruent to offset mod dp.
__device__ __forceinline__ bool any_kept(int64_t i0, int64_t i1, int64_t j0, int64_t j1, int64_t dp, int64_t off) {
  const int64_t lo = i0 + j0, hi = i1 + j1;
  const int64_t first = lo + (((off - lo) % dp) + dp) % dp;
  return first <= hi;
}

__device__ __forceinline__ bool kept(int64_t i, int64_t j, int64_t dp, int64_t off) {
  return (((i + j - off) % dp) + dp) % dp == 0;
}

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

template <typename scalar_t, int MODE>
__global__ void __launch_bounds__(kThreads) tile_gemm_kernel(const scalar_t* __restrict__ a,
                                                             const scalar_t* __restrict__ b,
                                                             const scalar_t* __restrict__ bias,
                                                             scalar_t* __restrict__ c, TileArgs p) {
  __shared__ float As[kBK][kBM + 4];
  __shared__ float Bs[kBK][kBN + 4];
  const int tid = threadIdx.x;
  const int tx = tid % 16, ty = tid / 16;  // 16 x 16 threads, 4 x 4 outputs each
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM, n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t m_last = min(m0 + kBM, p.M) - 1, n_last = min(n0 + kBN, p.N) - 1;
  float acc[4][4] = {};

  bool block_kept = true;
  if (MODE == kGradW) {
    block_kept = any_kept(m0 / p.tile, m_last / p.tile, n0 / p.tile, n_last / p.tile, p.dp, p.offset);
  }
  if (block_kept) {
    for (int64_t k0 = 0; k0 < p.K; k0 += kBK) {
      const int64_t k_last = min(k0 + kBK, p.K) - 1;
      if (MODE == kForward &&
          !any_kept(n0 / p.tile, n_last / p.tile, k0 / p.tile, k_last / p.tile, p.dp, p.offset)) continue;
      if (MODE == kGradX &&
          !any_kept(k0 / p.tile, k_last / p.tile, n0 / p.tile, n_last / p.tile, p.dp, p.offset)) continue;
#pragma unroll
      for (int e = 0; e < (kBM * kBK) / kThreads; ++e) {
        const int idx = tid + e * kThreads;
        const int mm = idx % kBM, kk = idx / kBM;  // consecutive threads: consecutive m
        const int64_t m = m0 + mm, k = k0 + kk;
        As[kk][mm] = (m < p.M && k < p.K) ? static_cast<float>(a[m * p.a_sm + k * p.a_sk]) : 0.f;
      }
#pragma unroll
      for (int e = 0; e < (kBN * kBK) / kThreads; ++e) {
        const int idx = tid + e * kThreads;
        const int nn = idx % kBN, kk = idx / kBN;
        const int64_t n = n0 + nn, k = k0 + kk;
        float v = 0.f;
        if (n < p.N && k < p.K) {
          const bool keep = MODE == kForward ? kept(n / p.tile, k / p.tile, p.dp, p.offset)
                          : MODE == kGradX   ? kept(k / p.tile, n / p.tile, p.dp, p.offset)
                                             : true;
          if (keep) v = static_cast<float>(b[k * p.b_sk + n * p.b_sn]);
        }
        Bs[kk][nn] = v;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kBK; ++kk) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[kk][ty * 4 + i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Bs[kk][tx * 4 + j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
      }
      __syncthreads();
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t m = m0 + ty * 4 + i;
    if (m >= p.M) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t n = n0 + tx * 4 + j;
      if (n >= p.N) continue;
      float v = p.alpha * acc[i][j];
      if (MODE == kGradW && !kept(m / p.tile, n / p.tile, p.dp, p.offset)) v = 0.f;
      if (MODE == kForward && bias != nullptr) v += static_cast<float>(bias[n * p.bias_stride]);
      c[m * p.ldc + n] = static_cast<scalar_t>(v);
    }
  }
}

}  // namespace cuda
}  // namespace fxdrop
