// The structured ops' device-independent plan (masks, GEMMs on kept rows/columns) and the
// per-device kernels it calls for everything that is not a GEMM.
//
// The pattern index math mirrors fxdrop/patterns.py (kept_slice, scale_value, tile_mask; a pattern
// may keep nothing) and the row groups mirror fxdrop/ops/composite.py (row_groups): those modules are
// the reference, and tests/test_extension.py checks these kernels against them for every dp 1-8 and
// every offset. Keep them in step.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "activation.h"

namespace fxdrop {

// One site's kept units of a width-n axis: range(start, stop, step), and the scale for them.
struct Mask {
  int64_t start = 0, stop = 0, step = 1, n = 0, count = 0;
  double scale = 1.0;
  bool full() const { return start == 0 && stop == n && step == 1; }
  bool contiguous() const { return step == 1; }
};

Mask unit_mask(const std::string& family, int64_t n, int64_t dp, int64_t offset, const std::string& scale,
               double p);

// A tile pattern folded onto a (out, in) weight: tile (i, j) is kept iff (i + j - offset) mod dp == 0.
struct TilePlan {
  int64_t tile = 32, dp = 1, offset = 0, grid_rows = 1, grid_cols = 1;
  double scale = 1.0;
};

TilePlan tile_plan(int64_t out_features, int64_t in_features, int64_t tile, int64_t dp, int64_t offset,
                   const std::string& scale, double p);

// An uninitialised tensor; on the CPU, of 8 MiB or more, from fxdrop's resident pool (structured.cpp):
// weight gradients and compact weight copies land on pages a freed one left resident, not fresh ones.
at::Tensor resident_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Everything but the GEMMs, per device (cpu/kernels.cpp, cuda/kernels.cu).
struct Kernels {
  virtual ~Kernels() = default;
  // z: (rows, k) contiguous GEMM output without bias. Adds bias (k,) (maybe strided or undefined) and
  // applies act. Returns {z_saved, h}: z_saved is z (pre-activation) when keep_z, else an empty
  // tensor and h may alias z.
  virtual std::pair<at::Tensor, at::Tensor> bias_act(at::Tensor z, const at::Tensor& bias, const Act& act,
                                                     bool keep_z) const = 0;
  // (rows, mask.n): alpha * values at the kept columns, zeros elsewhere; one pass.
  virtual at::Tensor scatter_columns(const at::Tensor& values, const Mask& mask, double alpha) const = 0;
  // g = act'(z, h) * (scale * g_in); g_in (rows, k) may be a strided view (it is never written).
  // With col_sum, also returns the column sums of g (the bias gradient), in g's dtype.
  virtual std::pair<at::Tensor, at::Tensor> act_grad(const at::Tensor& g_in, const at::Tensor& z,
                                                     const at::Tensor& h, const Act& act, double scale,
                                                     bool col_sum) const = 0;
  // Zero every element of full (2-D, unit column stride, any row stride) outside rows x cols (nullptr:
  // all rows / all columns).
  virtual void zero_outside(at::Tensor& full, const Mask* rows, const Mask* cols) const = 0;
  // full (as for zero_outside) = zeros with alpha * compact at rows x cols (nullptr: all); compact is
  // (|rows|, |cols|).
  virtual void expand(at::Tensor& full, const at::Tensor& compact, const Mask* rows, const Mask* cols,
                      double alpha) const = 0;
  // x * mask along the last dim (0 dropped, mask.scale kept).
  virtual at::Tensor unit_dropout(const at::Tensor& x, const Mask& mask) const = 0;
  virtual at::Tensor tile_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                                  const TilePlan& plan) const = 0;
  // {grad_x2, grad_weight} (dense, zeros where nothing was used).
  virtual std::pair<at::Tensor, at::Tensor> tile_backward(const at::Tensor& g2, const at::Tensor& x2,
                                                          const at::Tensor& weight, const TilePlan& plan) const = 0;
};

// The ops, for one device's Kernels. Signatures follow fxdrop/ops/schema.py.
std::tuple<at::Tensor, std::vector<at::Tensor>> chain(
    const Kernels& k, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::List<bool> has_bias, const at::Tensor& patterns, const std::string& family,
    const std::vector<std::string>& activations, bool input_dropout, bool output_dropout,
    const std::string& scale, const std::vector<double>& rates);

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> chain_backward(
    const Kernels& k, const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::List<bool> has_bias, const at::Tensor& patterns, at::TensorList saved, const std::string& family,
    const std::vector<std::string>& activations, bool input_dropout, bool output_dropout,
    const std::string& scale, const std::vector<double>& rates, bool needs_input_grad);

at::Tensor unit_dropout(const Kernels& k, const at::Tensor& x, const at::Tensor& pattern, const std::string& family,
                        const std::string& scale, double p);

at::Tensor tile_linear(const Kernels& k, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& pattern, int64_t tile,
                       const std::string& scale, double p);

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_linear_backward(
    const Kernels& k, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& pattern, int64_t tile, const std::string& scale, double p, bool has_bias);

}  // namespace fxdrop
