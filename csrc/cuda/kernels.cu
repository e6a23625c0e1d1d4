// CUDA kernels of the structured ops and their registration for the CUDA dispatch key.
//
// The plan (csrc/structured.cpp) is shared with the CPU build; here are the passes around the
// GEMMs, each one kernel: bias + activation (all activations, fused), scatter to full width with
// zeros + scale, activation gradient + scale + bias-gradient column sums, dense weight gradients
// written in one pass, and the tile family's tile-skipping GEMM (tile_gemm.cuh).
//
// Row family on the GPU: the consumer's kept weight columns are gathered (one strided copy of
// |W|/dp elements, memory-bound: about 15 us for 8192 x 4096 bf16 at ~4.5 TB/s) and fed to cuBLAS,
// rather than a hand-written GEMM that gathers K with a stride: cuBLAS's Hopper kernels (wgmma,
// TMA pipelines) are far ahead of anything we could write and tune blind, and the copy is a few
// percent of the ~100 us shrunken GEMM it feeds. Not yet measured on a GPU (compile-checked only).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <cstdlib>

#include "../structured.h"
#include "tile_gemm.cuh"

namespace fxdrop {
namespace cuda {
namespace {

constexpr int kBlock = 256;

inline int blocks_for(int64_t n) {
  const int64_t b = (n + kBlock - 1) / kBlock;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(b, 1), 65535LL * 8));
}

#define FXDROP_GRID_STRIDE(i, n) \
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < (n); \
       i += static_cast<int64_t>(blockDim.x) * gridDim.x)

template <typename scalar_t>
__global__ void bias_act_kernel(scalar_t* z, scalar_t* h, const scalar_t* bias, int64_t bias_stride, int64_t rows,
                                int64_t cols, ActKind kind, float arg) {
  using acc_t = at::opmath_type<scalar_t>;
  FXDROP_GRID_STRIDE(i, rows * cols) {
    acc_t v = static_cast<acc_t>(z[i]);
    if (bias != nullptr) {
      v += static_cast<acc_t>(bias[(i % cols) * bias_stride]);
      z[i] = static_cast<scalar_t>(v);
      v = static_cast<acc_t>(z[i]);
    }
    h[i] = static_cast<scalar_t>(act_forward<acc_t>(kind, static_cast<acc_t>(arg), v));
  }
}

template <typename scalar_t>
__global__ void scatter_columns_kernel(const scalar_t* v, scalar_t* full, int64_t rows, Mask m, float alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  FXDROP_GRID_STRIDE(i, rows * m.n) {
    const int64_t r = i / m.n, c = i % m.n;
    acc_t out = 0;
    if (c >= m.start && c < m.stop && (c - m.start) % m.step == 0) {
      out = static_cast<acc_t>(alpha) * static_cast<acc_t>(v[r * m.count + (c - m.start) / m.step]);
    }
    full[i] = static_cast<scalar_t>(out);
  }
}

// One thread per column (consecutive threads, consecutive columns: coalesced), a chunk of rows per
// blockIdx.y; column sums reduced over threadIdx.y in shared memory, then one atomicAdd per column.
template <typename scalar_t>
__global__ void act_grad_kernel(const scalar_t* g_in, int64_t gs0, int64_t gs1, const scalar_t* z,
                                const scalar_t* h, scalar_t* out, float* col_sum, int64_t rows, int64_t cols,
                                int64_t rows_per_block, ActKind kind, float arg, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ float partial[8][33];
  const int64_t c = blockIdx.x * 32 + threadIdx.x;
  const int64_t r0 = blockIdx.y * rows_per_block, r1 = min(rows, r0 + rows_per_block);
  float sum = 0.f;
  if (c < cols) {
    for (int64_t r = r0 + threadIdx.y; r < r1; r += blockDim.y) {
      const acc_t zv = z != nullptr ? static_cast<acc_t>(z[r * cols + c]) : acc_t(0);
      const acc_t v = act_backward<acc_t>(kind, static_cast<acc_t>(arg),
                                          static_cast<acc_t>(scale) * static_cast<acc_t>(g_in[r * gs0 + c * gs1]),
                                          zv, static_cast<acc_t>(h[r * cols + c]));
      const scalar_t rounded = static_cast<scalar_t>(v);
      out[r * cols + c] = rounded;
      sum += static_cast<float>(rounded);
    }
  }
  if (col_sum == nullptr) return;
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    float total = 0.f;
    for (int y = 0; y < blockDim.y; ++y) total += partial[y][threadIdx.x];
    atomicAdd(col_sum + c, total);
  }
}

__device__ __forceinline__ bool in_mask(int64_t i, int64_t start, int64_t stop, int64_t step) {
  return i >= start && i < stop && (i - start) % step == 0;
}

template <typename scalar_t>
__global__ void zero_outside_kernel(scalar_t* full, int64_t rows, int64_t cols, int64_t ld, bool has_r, Mask rm,
                                    bool has_c, Mask cm) {
  FXDROP_GRID_STRIDE(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    const bool inside = (!has_r || in_mask(r, rm.start, rm.stop, rm.step)) &&
                        (!has_c || in_mask(c, cm.start, cm.stop, cm.step));
    if (!inside) full[r * ld + c] = scalar_t(0);
  }
}

template <typename scalar_t>
__global__ void expand_kernel(scalar_t* full, const scalar_t* compact, int64_t rows, int64_t cols, int64_t ld,
                              int64_t width, bool has_r, Mask rm, bool has_c, Mask cm, float alpha) {
  using acc_t = at::opmath_type<scalar_t>;
  FXDROP_GRID_STRIDE(i, rows * cols) {
    const int64_t r = i / cols, c = i % cols;
    acc_t v = 0;
    if ((!has_r || in_mask(r, rm.start, rm.stop, rm.step)) && (!has_c || in_mask(c, cm.start, cm.stop, cm.step))) {
      const int64_t ri = has_r ? (r - rm.start) / rm.step : r;
      const int64_t ci = has_c ? (c - cm.start) / cm.step : c;
      v = static_cast<acc_t>(alpha) * static_cast<acc_t>(compact[ri * width + ci]);
    }
    full[r * ld + c] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
__global__ void unit_dropout_kernel(const scalar_t* x, scalar_t* y, int64_t total, Mask m, float scale) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t s = static_cast<acc_t>(static_cast<scalar_t>(scale));
  FXDROP_GRID_STRIDE(i, total) {
    const int64_t c = i % m.n;
    y[i] = in_mask(c, m.start, m.stop, m.step) ? static_cast<scalar_t>(s * static_cast<acc_t>(x[i])) : scalar_t(0);
  }
}

template <int MODE>
void launch_tile_gemm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias, at::Tensor& c,
                      const TileArgs& args) {
  const dim3 grid((args.N + kBN - 1) / kBN, (args.M + kBM - 1) / kBM);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, c.scalar_type(), "fxdrop_tile_gemm", [&] {
    tile_gemm_kernel<scalar_t, MODE><<<grid, kThreads, 0, stream>>>(
        a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, c.mutable_data_ptr<scalar_t>(), args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

struct CudaKernels final : Kernels {
  static cudaStream_t stream() { return at::cuda::getCurrentCUDAStream(); }

  std::pair<at::Tensor, at::Tensor> bias_act(at::Tensor z, const at::Tensor& bias, const Act& act,
                                             bool keep_z) const override {
    at::Tensor h = (keep_z && act.kind != ActKind::None) ? at::empty_like(z) : z;
    const int64_t rows = z.size(0), cols = z.size(1);
    if (z.numel() == 0) return {keep_z ? z : at::Tensor(), h};
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fxdrop_bias_act", [&] {
      bias_act_kernel<scalar_t><<<blocks_for(z.numel()), kBlock, 0, stream()>>>(
          z.mutable_data_ptr<scalar_t>(), h.mutable_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, bias.defined() ? bias.stride(0) : 0, rows,
          cols, act.kind, static_cast<float>(act.arg));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return {keep_z ? z : at::Tensor(), h};
  }

  at::Tensor scatter_columns(const at::Tensor& values, const Mask& m, double alpha) const override {
    const auto v = values.contiguous();
    auto full = at::empty({v.size(0), m.n}, v.options());
    if (full.numel() == 0) return full;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "fxdrop_scatter_columns", [&] {
      scatter_columns_kernel<scalar_t><<<blocks_for(full.numel()), kBlock, 0, stream()>>>(
          v.const_data_ptr<scalar_t>(), full.mutable_data_ptr<scalar_t>(), v.size(0), m, static_cast<float>(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return full;
  }

  std::pair<at::Tensor, at::Tensor> act_grad(const at::Tensor& g_in, const at::Tensor& z, const at::Tensor& h,
                                             const Act& act, double scale, bool col_sum) const override {
    const int64_t rows = g_in.size(0), cols = g_in.size(1);
    auto out = at::empty({rows, cols}, g_in.options());
    auto sums = col_sum ? at::zeros({cols}, g_in.options().dtype(at::kFloat)) : at::Tensor();
    if (out.numel() > 0) {
      const int64_t rows_per_block = 64;
      const dim3 grid((cols + 31) / 32, (rows + rows_per_block - 1) / rows_per_block);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_in.scalar_type(), "fxdrop_act_grad", [&] {
        act_grad_kernel<scalar_t><<<grid, dim3(32, 8), 0, stream()>>>(
            g_in.const_data_ptr<scalar_t>(), g_in.stride(0), g_in.stride(1),
            act.needs_input() ? z.const_data_ptr<scalar_t>() : nullptr, h.const_data_ptr<scalar_t>(),
            out.mutable_data_ptr<scalar_t>(), col_sum ? sums.mutable_data_ptr<float>() : nullptr, rows, cols,
            rows_per_block, act.kind, static_cast<float>(act.arg), static_cast<float>(scale));
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    return {out, col_sum ? sums.to(g_in.scalar_type()) : at::Tensor()};
  }

  void zero_outside(at::Tensor& full, const Mask* rows, const Mask* cols) const override {
    if (full.numel() == 0 || (rows == nullptr && cols == nullptr)) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, full.scalar_type(), "fxdrop_zero_outside", [&] {
      zero_outside_kernel<scalar_t><<<blocks_for(full.numel()), kBlock, 0, stream()>>>(
          full.mutable_data_ptr<scalar_t>(), full.size(0), full.size(1), full.stride(0), rows != nullptr,
          rows ? *rows : Mask{}, cols != nullptr, cols ? *cols : Mask{});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  void expand(at::Tensor& full, const at::Tensor& compact_in, const Mask* rows, const Mask* cols,
              double alpha) const override {
    const auto compact = compact_in.contiguous();
    if (full.numel() == 0) return;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, full.scalar_type(), "fxdrop_expand", [&] {
      expand_kernel<scalar_t><<<blocks_for(full.numel()), kBlock, 0, stream()>>>(
          full.mutable_data_ptr<scalar_t>(), compact.const_data_ptr<scalar_t>(), full.size(0), full.size(1),
          full.stride(0), compact.size(1), rows != nullptr, rows ? *rows : Mask{}, cols != nullptr,
          cols ? *cols : Mask{}, static_cast<float>(alpha));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  at::Tensor unit_dropout(const at::Tensor& x_in, const Mask& m) const override {
    const auto x = x_in.contiguous();
    auto y = at::empty_like(x);
    if (x.numel() == 0) return y;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fxdrop_unit_dropout", [&] {
      unit_dropout_kernel<scalar_t><<<blocks_for(x.numel()), kBlock, 0, stream()>>>(
          x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), x.numel(), m, static_cast<float>(m.scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return y;
  }

  static TileArgs args(const TilePlan& t, int64_t M, int64_t N, int64_t K) {
    TileArgs a{};
    a.M = M; a.N = N; a.K = K;
    a.tile = t.tile; a.dp = t.dp; a.offset = t.offset;
    a.alpha = static_cast<float>(t.scale);
    return a;
  }

  // The tile-skipping kernel is a plain-FMA baseline that has not met a GPU yet; until it is measured
  // against cuBLAS, the default is one cuBLAS GEMM per residue group of tile rows on gathered
  // operands (what the CPU kernels do). FXDROP_TILE_GEMM=1 selects the tile-skipping kernel.
  static bool use_tile_gemm() {
    const char* v = std::getenv("FXDROP_TILE_GEMM");
    return v != nullptr && v[0] == '1';
  }

  struct Group {
    at::Tensor rows, cols;  // unit indices on the device
  };

  static at::Tensor indices(int64_t n, int64_t tile, int64_t dp, int64_t residue, const at::Device& device) {
    std::vector<int64_t> ids;
    for (int64_t j = residue; j * tile < n; j += dp)
      for (int64_t u = j * tile; u < std::min(n, (j + 1) * tile); ++u) ids.push_back(u);
    return at::tensor(ids, at::TensorOptions().dtype(at::kLong)).to(device, /*non_blocking=*/false);
  }

  static std::vector<Group> groups(const TilePlan& t, int64_t out_f, int64_t in_f, const at::Device& device) {
    std::vector<Group> out;
    for (int64_t r = 0; r < std::min(t.dp, t.grid_rows); ++r) {
      const int64_t residue = (((t.offset - r) % t.dp) + t.dp) % t.dp;
      out.push_back({indices(out_f, t.tile, t.dp, r, device), indices(in_f, t.tile, t.dp, residue, device)});
    }
    return out;
  }

  at::Tensor tile_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                          const TilePlan& t) const override {
    const int64_t batch = x2.size(0), out_f = weight.size(0), in_f = weight.size(1);
    auto y = at::empty({batch, out_f}, x2.options());
    if (y.numel() == 0) return y;
    if (!use_tile_gemm()) {
      for (const auto& g : groups(t, out_f, in_f, x2.device())) {
        at::Tensor part;
        if (g.cols.numel() == 0) {
          part = bias.defined() ? bias.index_select(0, g.rows).expand({batch, g.rows.numel()})
                                : at::zeros({batch, g.rows.numel()}, x2.options());
        } else {
          const auto w = weight.index_select(0, g.rows).index_select(1, g.cols);
          part = bias.defined() ? at::addmm(bias.index_select(0, g.rows), x2.index_select(1, g.cols), w.t(), 1, t.scale)
                                : at::mm(x2.index_select(1, g.cols), w.t()).mul_(t.scale);
        }
        y.index_copy_(1, g.rows, part);
      }
      return y;
    }
    TileArgs a = args(t, batch, out_f, in_f);
    a.a_sm = in_f; a.a_sk = 1;     // x (batch, in)
    a.b_sk = 1; a.b_sn = in_f;     // W^T: B(k, n) = W[n, k]
    a.ldc = out_f;
    a.bias_stride = bias.defined() ? bias.stride(0) : 0;
    launch_tile_gemm<kForward>(x2, weight, bias, y, a);
    return y;
  }

  std::pair<at::Tensor, at::Tensor> tile_backward(const at::Tensor& g2, const at::Tensor& x2,
                                                  const at::Tensor& weight, const TilePlan& t) const override {
    const int64_t batch = x2.size(0), out_f = weight.size(0), in_f = weight.size(1);
    if (!use_tile_gemm()) {
      auto grad_x = at::zeros({batch, in_f}, x2.options());
      auto grad_w = at::zeros({out_f, in_f}, weight.options());
      for (const auto& g : groups(t, out_f, in_f, x2.device())) {
        if (g.cols.numel() == 0) continue;
        const auto g_rows = g2.index_select(1, g.rows);
        const auto x_cols = x2.index_select(1, g.cols);
        const auto gw = at::mm(g_rows.t(), x_cols).mul_(t.scale);
        grad_w.index_put_({g.rows.unsqueeze(1), g.cols.unsqueeze(0)}, gw);
        const auto w = weight.index_select(0, g.rows).index_select(1, g.cols);
        grad_x.index_copy_(1, g.cols, at::mm(g_rows, w).mul_(t.scale));  // groups read disjoint columns
      }
      return {grad_x, grad_w};
    }
    auto grad_x = at::empty({batch, in_f}, x2.options());
    auto grad_w = at::empty({out_f, in_f}, weight.options());
    if (grad_x.numel() > 0) {
      TileArgs a = args(t, batch, in_f, out_f);
      a.a_sm = out_f; a.a_sk = 1;  // g (batch, out)
      a.b_sk = in_f; a.b_sn = 1;   // W (out, in)
      a.ldc = in_f;
      launch_tile_gemm<kGradX>(g2, weight, at::Tensor(), grad_x, a);
    }
    if (grad_w.numel() > 0) {
      TileArgs a = args(t, out_f, in_f, batch);
      a.a_sm = 1; a.a_sk = out_f;  // g^T: A(m, k) = g[k, m]
      a.b_sk = in_f; a.b_sn = 1;   // x (batch, in)
      a.ldc = in_f;
      launch_tile_gemm<kGradW>(g2, x2, at::Tensor(), grad_w, a);
    }
    return {grad_x, grad_w};
  }
};

const CudaKernels& kernels() {
  static const CudaKernels k;
  return k;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> chain_cuda(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, c10::List<bool> has_bias,
    const at::Tensor& patterns, std::string family, std::vector<std::string> activations, bool input_dropout,
    bool output_dropout, std::string scale, std::vector<double> rates) {
  const c10::cuda::CUDAGuard guard(x.device());
  return chain(kernels(), x, weights, biases, std::move(has_bias), patterns, family, activations, input_dropout,
               output_dropout, scale, rates);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> chain_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::List<bool> has_bias, const at::Tensor& patterns, at::TensorList saved, std::string family,
    std::vector<std::string> activations, bool input_dropout, bool output_dropout, std::string scale,
    std::vector<double> rates, bool needs_input_grad) {
  const c10::cuda::CUDAGuard guard(x.device());
  return chain_backward(kernels(), grad_y, x, weights, biases, std::move(has_bias), patterns, saved, family,
                        activations, input_dropout, output_dropout, scale, rates, needs_input_grad);
}

at::Tensor unit_dropout_cuda(const at::Tensor& x, const at::Tensor& pattern, std::string family, std::string scale,
                             double p) {
  const c10::cuda::CUDAGuard guard(x.device());
  return unit_dropout(kernels(), x, pattern, family, scale, p);
}

at::Tensor tile_linear_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            const at::Tensor& pattern, int64_t tile, std::string scale, double p) {
  const c10::cuda::CUDAGuard guard(x.device());
  return tile_linear(kernels(), x, weight, bias, pattern, tile, scale, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_linear_backward_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pattern,
    int64_t tile, std::string scale, double p, bool has_bias) {
  const c10::cuda::CUDAGuard guard(x.device());
  return tile_linear_backward(kernels(), grad_y, x, weight, pattern, tile, scale, p, has_bias);
}

}  // namespace
}  // namespace cuda
}  // namespace fxdrop

// Kernels only: the schemas are declared once, in fxdrop/ops/schema.py (keep in step with
// fxdrop/ops/extension.py COMPILED_OPS).
TORCH_LIBRARY_IMPL(fxdrop, CUDA, m) {
  m.impl("chain", TORCH_FN(fxdrop::cuda::chain_cuda));
  m.impl("chain_backward", TORCH_FN(fxdrop::cuda::chain_backward_cuda));
  m.impl("unit_dropout", TORCH_FN(fxdrop::cuda::unit_dropout_cuda));
  m.impl("tile_linear", TORCH_FN(fxdrop::cuda::tile_linear_cuda));
  m.impl("tile_linear_backward", TORCH_FN(fxdrop::cuda::tile_linear_backward_cuda));
}
