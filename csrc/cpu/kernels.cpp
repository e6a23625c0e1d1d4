// CPU kernels of the structured ops and their registration for the CPU dispatch key.
//
// The GEMMs are ATen's (MKL/oneDNN/OpenBLAS); what is here is the memory passes around them, each
// fused into one parallel loop: bias + activation, scatter to full width with zeros + scale,
// activation gradient + scale + bias-gradient column sums, and writing dense gradients (zeros
// outside the kept region) in a single pass. Transcendental activations use ATen's vectorised
// kernels instead (a scalar erf/exp loop is slower than the extra pass it saves).
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstring>
#include <type_traits>

#include "../structured.h"

namespace fxdrop {
namespace {

// Rows per task: at least at::internal::GRAIN_SIZE elements, as ATen's own loops do, so small
// tensors stay on one thread (waking the OpenMP team costs more than the pass on a busy machine).
inline int64_t grain(int64_t row_elements) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, row_elements));
}

// Rows of a residue class of tiles: [tile*j, min(tile*(j+1), n)) for j = residue, residue + dp, ...
std::vector<std::pair<int64_t, int64_t>> tile_runs(int64_t n, int64_t tile, int64_t dp, int64_t residue) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t j = residue; j * tile < n; j += dp) {
    const int64_t a = j * tile, b = std::min(n, (j + 1) * tile);
    if (!runs.empty() && runs.back().second == a) runs.back().second = b;  // dp == 1: one run, a view
    else runs.emplace_back(a, b);
  }
  return runs;
}

// Calls f(std::integral_constant<ActKind, kind>) for the activations the scalar loops handle, so
// the kind is a compile-time constant inside the loop (no per-element switch; the loop vectorises).
template <typename F>
void with_simple_kind(ActKind kind, F&& f) {
  switch (kind) {
    case ActKind::None: return f(std::integral_constant<ActKind, ActKind::None>{});
    case ActKind::Relu: return f(std::integral_constant<ActKind, ActKind::Relu>{});
    default: return f(std::integral_constant<ActKind, ActKind::LeakyRelu>{});
  }
}

int64_t run_length(const std::vector<std::pair<int64_t, int64_t>>& runs) {
  int64_t total = 0;
  for (auto [a, b] : runs) total += b - a;
  return total;
}

// dst (rows, |runs|) = src[:, runs] for a row-major src (rows, n); dst contiguous.
template <typename T>
void gather_columns(const T* src, int64_t src_ld, T* dst, int64_t rows,
                    const std::vector<std::pair<int64_t, int64_t>>& runs) {
  const int64_t width = run_length(runs);
  at::parallel_for(0, rows, grain(width), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      T* out = dst + r * width;
      for (auto [a, b] : runs) {
        std::memcpy(out, src + r * src_ld + a, (b - a) * sizeof(T));
        out += b - a;
      }
    }
  });
}

struct CpuKernels final : Kernels {
  std::pair<at::Tensor, at::Tensor> bias_act(at::Tensor z, const at::Tensor& bias, const Act& act,
                                             bool keep_z) const override {
    const int64_t rows = z.size(0), cols = z.size(1);
    at::Tensor h = (keep_z && act.kind != ActKind::None) ? at::empty_like(z) : z;
    if (!act.simple()) {
      if (bias.defined()) z.add_(bias);
      switch (act.kind) {
        case ActKind::Gelu: h = at::gelu(z); break;
        case ActKind::GeluTanh: h = at::gelu(z, "tanh"); break;
        case ActKind::Silu: h = at::silu(z); break;
        case ActKind::Tanh: h = keep_z ? at::tanh(z) : z.tanh_(); break;
        case ActKind::Sigmoid: h = keep_z ? at::sigmoid(z) : z.sigmoid_(); break;
        default: h = at::elu(z, act.arg); break;
      }
      return {keep_z ? z : at::Tensor(), h};
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "fxdrop_bias_act", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      scalar_t* zp = z.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
      const int64_t bs = bias.defined() ? bias.stride(0) : 0;
      const acc_t arg = static_cast<acc_t>(act.arg);
      with_simple_kind(act.kind, [&](auto kind_c) {
        constexpr ActKind kind = decltype(kind_c)::value;
        at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* zr = zp + r * cols;
            scalar_t* hr = hp + r * cols;
            for (int64_t c = 0; c < cols; ++c) {
              acc_t v = static_cast<acc_t>(zr[c]);
              if (bp != nullptr) {
                v += static_cast<acc_t>(bp[c * bs]);
                zr[c] = static_cast<scalar_t>(v);
                v = static_cast<acc_t>(zr[c]);  // h = act(z) of the rounded z, as the reference does
              }
              hr[c] = static_cast<scalar_t>(act_forward<acc_t>(kind, arg, v));
            }
          }
        });
      });
    });
    return {keep_z ? z : at::Tensor(), h};
  }

  at::Tensor scatter_columns(const at::Tensor& values, const Mask& m, double alpha) const override {
    const int64_t rows = values.size(0);
    auto full = at::empty({rows, m.n}, values.options());
    const auto v = values.contiguous();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, v.scalar_type(), "fxdrop_scatter_columns", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* vp = v.const_data_ptr<scalar_t>();
      scalar_t* fp = full.data_ptr<scalar_t>();
      const acc_t a = static_cast<acc_t>(alpha);
      at::parallel_for(0, rows, grain(m.n), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* vr = vp + r * m.count;
          scalar_t* fr = fp + r * m.n;
          if (m.step == 1) {
            std::memset(fr, 0, m.start * sizeof(scalar_t));
            for (int64_t c = 0; c < m.count; ++c) fr[m.start + c] = static_cast<scalar_t>(a * vr[c]);
            std::memset(fr + m.stop, 0, (m.n - m.stop) * sizeof(scalar_t));
          } else {
            std::memset(fr, 0, m.n * sizeof(scalar_t));
            for (int64_t c = 0; c < m.count; ++c) fr[m.start + c * m.step] = static_cast<scalar_t>(a * vr[c]);
          }
        }
      });
    });
    return full;
  }

  std::pair<at::Tensor, at::Tensor> act_grad(const at::Tensor& g_in, const at::Tensor& z, const at::Tensor& h,
                                             const Act& act, double scale, bool col_sum) const override {
    const int64_t rows = g_in.size(0), cols = g_in.size(1);
    if (!act.simple()) {
      at::Tensor g = scale == 1.0 ? g_in : g_in * scale;
      switch (act.kind) {
        case ActKind::Gelu: g = at::gelu_backward(g, z); break;
        case ActKind::GeluTanh: g = at::gelu_backward(g, z, "tanh"); break;
        case ActKind::Silu: g = at::silu_backward(g, z); break;
        case ActKind::Tanh: g = at::tanh_backward(g, h); break;
        case ActKind::Sigmoid: g = at::sigmoid_backward(g, h); break;
        default: g = at::elu_backward(g, act.arg, 1, 1, false, z); break;
      }
      return {g, col_sum ? g.sum(0) : at::Tensor()};
    }
    auto g = at::empty({rows, cols}, g_in.options());
    // Per-chunk partial column sums in the accumulation type, reduced afterwards: deterministic.
    const int64_t chunks = !col_sum ? 0
                           : rows * cols < at::internal::GRAIN_SIZE
                               ? 1
                               : std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
    const auto acc_dtype = at::toOpMathType(g_in.scalar_type());
    auto partial = col_sum ? at::zeros({chunks, cols}, g_in.options().dtype(acc_dtype)) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g_in.scalar_type(), "fxdrop_act_grad", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* gp = g_in.const_data_ptr<scalar_t>();
      const int64_t gs0 = g_in.stride(0), gs1 = g_in.stride(1);
      const scalar_t* zp = act.needs_input() ? z.const_data_ptr<scalar_t>() : nullptr;
      const scalar_t* hp = h.const_data_ptr<scalar_t>();
      scalar_t* op = g.data_ptr<scalar_t>();
      acc_t* sp = col_sum ? partial.data_ptr<acc_t>() : nullptr;
      const acc_t s = static_cast<acc_t>(scale), arg = static_cast<acc_t>(act.arg);
      with_simple_kind(act.kind, [&](auto kind_c) {
      constexpr ActKind kind = decltype(kind_c)::value;
      auto body = [&](int64_t r0, int64_t r1, acc_t* sums) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* gr = gp + r * gs0;
          scalar_t* orow = op + r * cols;
          for (int64_t c = 0; c < cols; ++c) {
            const acc_t zv = zp != nullptr ? static_cast<acc_t>(zp[r * cols + c]) : acc_t(0);
            const acc_t v = act_backward<acc_t>(kind, arg, s * static_cast<acc_t>(gr[c * gs1]), zv,
                                                static_cast<acc_t>(hp[r * cols + c]));
            orow[c] = static_cast<scalar_t>(v);
            if (sums != nullptr) sums[c] += static_cast<acc_t>(orow[c]);
          }
        }
      };
      if (col_sum) {
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
          for (int64_t chunk = c0; chunk < c1; ++chunk) {
            body(rows * chunk / chunks, rows * (chunk + 1) / chunks, sp + chunk * cols);
          }
        });
      } else {
        at::parallel_for(0, rows, grain(cols), [&](int64_t r0, int64_t r1) { body(r0, r1, nullptr); });
      }
      });
    });
    return {g, col_sum ? partial.sum(0).to(g.scalar_type()) : at::Tensor()};
  }

  void zero_outside(at::Tensor& full, const Mask* rows, const Mask* cols) const override {
    const int64_t n_rows = full.size(0), n_cols = full.size(1), ld = full.stride(0);
    const int64_t item = full.element_size();
    char* base = static_cast<char*>(full.data_ptr());
    at::parallel_for(0, n_rows, grain(n_cols), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        char* row = base + r * ld * item;
        const bool kept = rows == nullptr ||
                          (r >= rows->start && r < rows->stop && (r - rows->start) % rows->step == 0);
        if (!kept) {
          std::memset(row, 0, n_cols * item);
        } else if (cols != nullptr) {  // contiguous columns: zero the two sides
          std::memset(row, 0, cols->start * item);
          std::memset(row + cols->stop * item, 0, (n_cols - cols->stop) * item);
        }
      }
    });
  }

  void expand(at::Tensor& full, const at::Tensor& compact_in, const Mask* rows, const Mask* cols,
              double alpha) const override {
    const auto compact = compact_in.contiguous();
    const int64_t n_rows = full.size(0), n_cols = full.size(1), width = compact.size(1), ld = full.stride(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, full.scalar_type(), "fxdrop_expand", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* cp = compact.const_data_ptr<scalar_t>();
      scalar_t* fp = full.data_ptr<scalar_t>();
      const acc_t a = static_cast<acc_t>(alpha);
      const int64_t c_start = cols ? cols->start : 0, c_step = cols ? cols->step : 1;
      at::parallel_for(0, n_rows, grain(n_cols), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* fr = fp + r * ld;
          std::memset(fr, 0, n_cols * sizeof(scalar_t));
          if (rows != nullptr && !(r >= rows->start && r < rows->stop && (r - rows->start) % rows->step == 0)) {
            continue;
          }
          const int64_t ri = rows ? (r - rows->start) / rows->step : r;
          const scalar_t* cr = cp + ri * width;
          for (int64_t c = 0; c < width; ++c) fr[c_start + c * c_step] = static_cast<scalar_t>(a * cr[c]);
        }
      });
    });
  }

  at::Tensor unit_dropout(const at::Tensor& x_in, const Mask& m) const override {
    const auto x = x_in.contiguous();
    auto y = at::empty_like(x);
    const int64_t n = m.n, rows = n ? x.numel() / n : 0;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "fxdrop_unit_dropout", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* xp = x.const_data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      // The reference multiplies by a mask in x's dtype: round the scale the same way.
      const acc_t s = static_cast<acc_t>(static_cast<scalar_t>(m.scale));
      at::parallel_for(0, rows, grain(n), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const scalar_t* xr = xp + r * n;
          scalar_t* yr = yp + r * n;
          std::memset(yr, 0, n * sizeof(scalar_t));
          for (int64_t c = m.start; c < m.stop; c += m.step) yr[c] = static_cast<scalar_t>(s * xr[c]);
        }
      });
    });
    return y;
  }

  // Kept tiles grouped by residue of the tile row: group r = tile rows r, r + dp, ... reads tile
  // columns (offset - r) mod dp, + dp, ...: one dense GEMM per group on gathered operands.
  struct Group {
    std::vector<std::pair<int64_t, int64_t>> rows, cols;
  };

  static std::vector<Group> groups(const TilePlan& t, int64_t out_features, int64_t in_features) {
    std::vector<Group> out;
    for (int64_t r = 0; r < std::min(t.dp, t.grid_rows); ++r) {
      const int64_t residue = (((t.offset - r) % t.dp) + t.dp) % t.dp;
      out.push_back({tile_runs(out_features, t.tile, t.dp, r), tile_runs(in_features, t.tile, t.dp, residue)});
    }
    return out;
  }

  // src[:, runs] (a view when the runs are one block, else a gather).
  static at::Tensor columns(const at::Tensor& src, const std::vector<std::pair<int64_t, int64_t>>& runs) {
    if (runs.size() == 1) return src.slice(1, runs[0].first, runs[0].second);
    auto dst = at::empty({src.size(0), run_length(runs)}, src.options());
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "fxdrop_gather", [&] {
      gather_columns(src.const_data_ptr<scalar_t>(), src.size(1), dst.data_ptr<scalar_t>(), src.size(0), runs);
    });
    return dst;
  }

  // weight[rows][:, cols] in one copy (a view when both are one run).
  static at::Tensor block(const at::Tensor& w, const Group& g) {
    if (g.rows.size() == 1) return columns(w.slice(0, g.rows[0].first, g.rows[0].second), g.cols);
    std::vector<int64_t> row_ids;
    for (auto [a, b] : g.rows) for (int64_t o = a; o < b; ++o) row_ids.push_back(o);
    const int64_t width = run_length(g.cols), ld = w.size(1);
    auto dst = at::empty({static_cast<int64_t>(row_ids.size()), width}, w.options());
    const int64_t item = w.element_size();
    const char* src = static_cast<const char*>(w.const_data_ptr());
    char* out = static_cast<char*>(dst.data_ptr());
    at::parallel_for(0, static_cast<int64_t>(row_ids.size()), grain(width), [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        char* o = out + i * width * item;
        for (auto [a, b] : g.cols) {
          std::memcpy(o, src + (row_ids[i] * ld + a) * item, (b - a) * item);
          o += (b - a) * item;
        }
      }
    });
    return dst;
  }

  at::Tensor tile_forward(const at::Tensor& x2, const at::Tensor& weight, const at::Tensor& bias,
                          const TilePlan& t) const override {
    const int64_t batch = x2.size(0), out_f = weight.size(0), in_f = weight.size(1);
    auto y = at::empty({batch, out_f}, x2.options());
    for (const auto& grp : groups(t, out_f, in_f)) {
      at::Tensor part;  // (batch, |rows|) compact, without bias
      if (!grp.cols.empty()) part = at::mm(columns(x2, grp.cols), block(weight, grp).t());
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, y.scalar_type(), "fxdrop_tile_scatter", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const scalar_t* pp = part.defined() ? part.const_data_ptr<scalar_t>() : nullptr;
        const int64_t width = run_length(grp.rows);
        const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        const int64_t bs = bias.defined() ? bias.stride(0) : 0;
        scalar_t* yp = y.data_ptr<scalar_t>();
        const acc_t s = static_cast<acc_t>(t.scale);
        at::parallel_for(0, batch, grain(out_f), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const scalar_t* pr = pp != nullptr ? pp + r * width : nullptr;
            scalar_t* yr = yp + r * out_f;
            for (auto [a, b] : grp.rows) {
              for (int64_t o = a; o < b; ++o) {
                acc_t v = pr != nullptr ? s * static_cast<acc_t>(*pr++) : acc_t(0);
                if (bp != nullptr) v += static_cast<acc_t>(bp[o * bs]);
                yr[o] = static_cast<scalar_t>(v);
              }
            }
          }
        });
      });
    }
    return y;
  }

  std::pair<at::Tensor, at::Tensor> tile_backward(const at::Tensor& g2, const at::Tensor& x2,
                                                  const at::Tensor& weight, const TilePlan& t) const override {
    const int64_t batch = x2.size(0), out_f = weight.size(0), in_f = weight.size(1);
    auto grad_x = at::empty({batch, in_f}, x2.options());
    auto grad_w = resident_empty({out_f, in_f}, weight.options());
    std::vector<char> covered(in_f, 0);  // input columns some group writes
    for (const auto& grp : groups(t, out_f, in_f)) {
      for (auto [a, b] : grp.cols) std::fill(covered.begin() + a, covered.begin() + b, 1);
      at::Tensor gw, gx;  // (|rows|, |cols|) and (batch, |cols|), scaled
      if (!grp.cols.empty()) {
        const auto g_rows = columns(g2, grp.rows);
        gw = gemm_scaled(g_rows.t(), columns(x2, grp.cols), t.scale);
        gx = gemm_scaled(g_rows, block(weight, grp), t.scale);
      }
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, grad_w.scalar_type(), "fxdrop_tile_bwd", [&] {
        // grad_w rows of this group: kept tiles from gw, zeros elsewhere; one pass per row.
        scalar_t* wp = grad_w.data_ptr<scalar_t>();
        std::vector<int64_t> row_ids;
        for (auto [a, b] : grp.rows) for (int64_t o = a; o < b; ++o) row_ids.push_back(o);
        const scalar_t* gwp = gw.defined() ? gw.const_data_ptr<scalar_t>() : nullptr;
        const int64_t width = run_length(grp.cols);
        at::parallel_for(0, static_cast<int64_t>(row_ids.size()), grain(in_f), [&](int64_t i0, int64_t i1) {
          for (int64_t i = i0; i < i1; ++i) {
            scalar_t* wr = wp + row_ids[i] * in_f;
            std::memset(wr, 0, in_f * sizeof(scalar_t));
            if (gwp == nullptr) continue;
            const scalar_t* src = gwp + i * width;
            for (auto [a, b] : grp.cols) {
              std::memcpy(wr + a, src, (b - a) * sizeof(scalar_t));
              src += b - a;
            }
          }
        });
        if (gx.defined()) {  // distinct groups read distinct column residues: plain stores
          const scalar_t* gxp = gx.const_data_ptr<scalar_t>();
          scalar_t* xp = grad_x.data_ptr<scalar_t>();
          at::parallel_for(0, batch, grain(width), [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
              const scalar_t* src = gxp + r * width;
              for (auto [a, b] : grp.cols) {
                std::memcpy(xp + r * in_f + a, src, (b - a) * sizeof(scalar_t));
                src += b - a;
              }
            }
          });
        }
      });
    }
    // Input columns no kept tile reads get zero gradient.
    std::vector<std::pair<int64_t, int64_t>> gaps;
    for (int64_t c = 0; c < in_f;) {
      if (covered[c]) { ++c; continue; }
      int64_t e = c;
      while (e < in_f && !covered[e]) ++e;
      gaps.emplace_back(c, e);
      c = e;
    }
    if (!gaps.empty()) {
      const int64_t item = grad_x.element_size();
      char* base = static_cast<char*>(grad_x.data_ptr());
      at::parallel_for(0, batch, grain(in_f), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
          for (auto [a, b] : gaps) std::memset(base + (r * in_f + a) * item, 0, (b - a) * item);
      });
    }
    return {grad_x, grad_w};
  }

  static at::Tensor gemm_scaled(const at::Tensor& a, const at::Tensor& b, double alpha) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    if (alpha == 1.0) return at::mm_out(out, a, b);
    return at::addmm_out(out, out, a, b, 0, alpha);
  }
};

const CpuKernels& cpu() {
  static const CpuKernels kernels;
  return kernels;
}

// Dispatcher-facing signatures (schema types: str -> std::string, str[] -> std::vector<std::string>).
std::tuple<at::Tensor, std::vector<at::Tensor>> chain_cpu(
    const at::Tensor& x, at::TensorList weights, at::TensorList biases, c10::List<bool> has_bias,
    const at::Tensor& patterns, std::string family, std::vector<std::string> activations, bool input_dropout,
    bool output_dropout, std::string scale, std::vector<double> rates) {
  return chain(cpu(), x, weights, biases, std::move(has_bias), patterns, family, activations, input_dropout,
               output_dropout, scale, rates);
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> chain_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, at::TensorList biases,
    c10::List<bool> has_bias, const at::Tensor& patterns, at::TensorList saved, std::string family,
    std::vector<std::string> activations, bool input_dropout, bool output_dropout, std::string scale,
    std::vector<double> rates, bool needs_input_grad) {
  return chain_backward(cpu(), grad_y, x, weights, biases, std::move(has_bias), patterns, saved, family,
                        activations, input_dropout, output_dropout, scale, rates, needs_input_grad);
}

at::Tensor unit_dropout_cpu(const at::Tensor& x, const at::Tensor& pattern, std::string family, std::string scale,
                            double p) {
  return unit_dropout(cpu(), x, pattern, family, scale, p);
}

at::Tensor tile_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           const at::Tensor& pattern, int64_t tile, std::string scale, double p) {
  return tile_linear(cpu(), x, weight, bias, pattern, tile, scale, p);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_linear_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& pattern,
    int64_t tile, std::string scale, double p, bool has_bias) {
  return tile_linear_backward(cpu(), grad_y, x, weight, pattern, tile, scale, p, has_bias);
}

}  // namespace
}  // namespace fxdrop

// Kernels only: the schemas are declared once, in fxdrop/ops/schema.py. Keep this list in step
// with fxdrop/ops/extension.py (CPU_OPS).
TORCH_LIBRARY_IMPL(fxdrop, CPU, m) {
  m.impl("chain", TORCH_FN(fxdrop::chain_cpu));
  m.impl("chain_backward", TORCH_FN(fxdrop::chain_backward_cpu));
  m.impl("unit_dropout", TORCH_FN(fxdrop::unit_dropout_cpu));
  m.impl("tile_linear", TORCH_FN(fxdrop::tile_linear_cpu));
  m.impl("tile_linear_backward", TORCH_FN(fxdrop::tile_linear_backward_cpu));
}
