// Device-independent plan of the structured ops: checks, masks, and the shrunken GEMMs on kept
// rows/columns of each weight. Everything that is not a GEMM goes to the device's Kernels.
//
// Block family: every kept region is a plain strided view (no copies). Row family: kept rows of a
// weight are a BLAS-compatible view (row stride dp*in); kept columns have a column stride != 1,
// which BLAS cannot take, so they are gathered (one copy of |W|/dp elements) before the GEMM.
#include "structured.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <unordered_map>
#include <vector>
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fxdrop {

Act parse_activation(const std::string& name) {
  const auto colon = name.find(':');
  const std::string base = name.substr(0, colon);
  const bool has_arg = colon != std::string::npos;
  static const std::pair<const char*, ActKind> plain[] = {
      {"none", ActKind::None}, {"relu", ActKind::Relu}, {"gelu", ActKind::Gelu}, {"gelu_tanh", ActKind::GeluTanh},
      {"silu", ActKind::Silu}, {"tanh", ActKind::Tanh}, {"sigmoid", ActKind::Sigmoid}};
  for (const auto& [text, kind] : plain) {
    if (base == text && !has_arg) return Act{kind, 0.0};
  }
  if (base == "leaky_relu" || base == "elu") {
    Act act{base == "leaky_relu" ? ActKind::LeakyRelu : ActKind::Elu, base == "leaky_relu" ? 0.01 : 1.0};
    if (!has_arg || colon + 1 == name.size()) return act;
    try {
      size_t used = 0;
      act.arg = std::stod(name.substr(colon + 1), &used);
      if (used == name.size() - colon - 1) return act;
    } catch (const std::exception&) {
    }
  }
  TORCH_CHECK_VALUE(false, "unknown activation '", name, "'; expected one of none, relu, gelu, gelu_tanh, silu, ",
                    "tanh, sigmoid, leaky_relu:<slope> or elu:<alpha>");
}

static void check_scale(const std::string& scale) {
  TORCH_CHECK_VALUE(scale == "kept" || scale == "rate", "unknown scale mode '", scale,
                    "'; expected 'kept' or 'rate'");
}

static void check_pattern(int64_t dp, int64_t offset) {
  TORCH_CHECK_VALUE(dp >= 1, "Pattern.dp must be >= 1, got ", dp);
  TORCH_CHECK_VALUE(0 <= offset && offset < dp, "Pattern.offset must satisfy 0 <= offset < dp=", dp, ", got ",
                    offset);
}

// patterns.kept_slice / scale_value: every unit is kept by exactly one offset (no fold-back), so a
// pattern may keep nothing; "kept" scales by dp, which is unbiased per unit for every width.
Mask unit_mask(const std::string& family, int64_t n, int64_t dp, int64_t offset, const std::string& scale,
               double p) {
  TORCH_CHECK_VALUE(family == "row" || family == "block", "unknown pattern family '", family,
                    "'; expected one of row, block");
  check_scale(scale);
  TORCH_CHECK_VALUE(n >= 1, "a pattern needs at least one unit, got n=", n);
  check_pattern(dp, offset);
  Mask m;
  m.n = n;
  if (family == "row") {
    m.start = std::min(offset, n);
    m.stop = n;
    m.step = dp;
  } else {
    m.start = offset * n / dp;  // block b of the balanced partition: [b n / dp, (b + 1) n / dp)
    m.stop = (offset + 1) * n / dp;
    m.step = 1;
  }
  m.count = (m.stop - m.start + m.step - 1) / m.step;
  m.scale = scale == "kept" ? static_cast<double>(dp) : 1.0 / (1.0 - p);
  return m;
}

// patterns.tile_grid / tile_scale: tile (i, j) is kept iff (i + j - offset) mod dp == 0 (maybe none).
TilePlan tile_plan(int64_t out_features, int64_t in_features, int64_t tile, int64_t dp, int64_t offset,
                   const std::string& scale, double p) {
  check_scale(scale);
  check_pattern(dp, offset);
  TORCH_CHECK_VALUE(tile >= 1, "tile size must be >= 1, got ", tile);
  TORCH_CHECK_VALUE(out_features >= 1 && in_features >= 1, "tile patterns need a non-empty weight, got shape (",
                    out_features, ", ", in_features, ")");
  TilePlan t;
  t.tile = tile;
  t.dp = dp;
  t.offset = offset;
  t.grid_rows = (out_features + tile - 1) / tile;
  t.grid_cols = (in_features + tile - 1) / tile;
  t.scale = scale == "kept" ? static_cast<double>(dp) : 1.0 / (1.0 - p);
  return t;
}

// Fresh gradient buffers of many MiB are new pages every step: with zero_grad(set_to_none=True) the
// optimizer drops last step's gradients, glibc unmaps blocks that large, and the kernel faults the
// next step's back in and zeroes them 4 KiB at a time, which cost an fxdrop step at h = 4096 more than
// its shrunken GEMMs. So weight gradients of 8 MiB or more, and the compact weight copies and products
// of that size each step makes, come from a small pool of this library's own: a freed buffer goes back
// to the pool (its pages stay resident, on transparent huge pages where the system leaves them to
// madvise) and the next step's buffer of that size reuses it. The pool holds at most as many bytes as
// were ever handed out at once, so it never grows past what those buffers need at their peak. It is
// never destroyed: a tensor freed after static destruction still finds it.
namespace {

constexpr size_t kPooledBytes = size_t{8} << 20;
constexpr size_t kHugePage = size_t{2} << 20;

struct ResidentPool {
  std::mutex lock;
  std::unordered_map<size_t, std::vector<void*>> free;
  size_t held = 0, outstanding = 0, peak = 0;
};

ResidentPool& resident_pool() {
  static ResidentPool* pool = new ResidentPool();  // intentionally leaked (see above)
  return *pool;
}

void give_back(void* ptr, size_t bytes) {
  auto& pool = resident_pool();
  std::lock_guard<std::mutex> guard(pool.lock);
  pool.outstanding -= bytes;
  if (pool.held + bytes <= pool.peak) {
    pool.free[bytes].push_back(ptr);
    pool.held += bytes;
  } else {
    std::free(ptr);
  }
}

}  // namespace

at::Tensor resident_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t want = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (!options.device().is_cpu() || want < kPooledBytes) return at::empty(sizes, options);
  const size_t bytes = (want + kHugePage - 1) / kHugePage * kHugePage;
  void* ptr = nullptr;
  {
    auto& pool = resident_pool();
    std::lock_guard<std::mutex> guard(pool.lock);
    auto found = pool.free.find(bytes);
    if (found != pool.free.end() && !found->second.empty()) {
      ptr = found->second.back();
      found->second.pop_back();
      pool.held -= bytes;
    }
    pool.outstanding += bytes;
    pool.peak = std::max(pool.peak, pool.outstanding);
  }
  if (ptr == nullptr) {
    ptr = std::aligned_alloc(kHugePage, bytes);
    if (ptr == nullptr) {
      auto& pool = resident_pool();
      std::lock_guard<std::mutex> guard(pool.lock);
      pool.outstanding -= bytes;
      return at::empty(sizes, options);
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, bytes, MADV_HUGEPAGE);
#endif
  }
  return at::from_blob(ptr, sizes, [bytes](void* p) { give_back(p, bytes); }, options);
}


namespace {

std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

std::vector<std::pair<int64_t, int64_t>> pattern_rows(const at::Tensor& patterns, int64_t sites) {
  TORCH_CHECK_VALUE(patterns.scalar_type() == at::kLong && patterns.dim() == 2 && patterns.size(0) == sites &&
                        patterns.size(1) == 2,
                    "patterns must be an int64 tensor of shape (", sites, ", 2) = [dp, offset] per site, got ",
                    dtype_name(patterns.scalar_type()), " ", patterns.sizes());
  const at::Tensor cpu = patterns.to(at::kCPU).contiguous();
  const int64_t* data = cpu.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> rows;
  for (int64_t s = 0; s < sites; ++s) {
    check_pattern(data[2 * s], data[2 * s + 1]);
    rows.emplace_back(data[2 * s], data[2 * s + 1]);
  }
  return rows;
}

std::pair<int64_t, int64_t> single_pattern(const at::Tensor& pattern) {
  return pattern_rows(pattern.reshape({1, 2}), 1)[0];
}

std::vector<at::Tensor> expand_biases(at::TensorList biases, const c10::List<bool>& has_bias, size_t layers) {
  int64_t marked = 0;
  for (bool b : has_bias) marked += b;
  TORCH_CHECK_VALUE(marked == static_cast<int64_t>(biases.size()), "chain: has_bias marks ", marked,
                    " biases but ", biases.size(), " were given");
  TORCH_CHECK_VALUE(has_bias.size() == layers, "chain: ", layers, " weights but ", has_bias.size(),
                    " biases (use None for no bias)");
  std::vector<at::Tensor> out;
  size_t next = 0;
  for (bool b : has_bias) out.push_back(b ? biases[next++] : at::Tensor());
  return out;
}

// fxdrop.ops.composite.check_chain, same messages.
void check_chain(const at::Tensor& x, at::TensorList weights, const std::vector<at::Tensor>& biases) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "chain: x must be a floating-point tensor, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, "chain: x must have shape (..., in_features)");
  int64_t width = x.size(-1);
  for (size_t i = 0; i < weights.size(); ++i) {
    const auto& w = weights[i];
    TORCH_CHECK_VALUE(w.dim() == 2, "chain: weights[", i, "] must be 2-D (out, in), got shape ", w.sizes());
    TORCH_CHECK_TYPE(w.scalar_type() == x.scalar_type(), "chain: weights[", i, "] is ", dtype_name(w.scalar_type()),
                     " but x is ", dtype_name(x.scalar_type()));
    if (w.size(1) != width) {
      std::ostringstream from;
      if (i == 0) from << "x"; else from << "weights[" << i - 1 << "]";
      TORCH_CHECK_VALUE(false, "chain: weights[", i, "] expects ", w.size(1), " input features, but ", from.str(),
                        " gives ", width);
    }
    const auto& b = biases[i];
    TORCH_CHECK_VALUE(!b.defined() || (b.dim() == 1 && b.size(0) == w.size(0) && b.scalar_type() == x.scalar_type()),
                      "chain: biases[", i, "] must be ", dtype_name(x.scalar_type()), " of shape (", w.size(0),
                      ",), got ", dtype_name(b.defined() ? b.scalar_type() : x.scalar_type()), " ", b.defined() ? b.sizes() : at::IntArrayRef());
    TORCH_CHECK_VALUE(w.device() == x.device() && (!b.defined() || b.device() == x.device()),
                      "chain: weights[", i, "] and biases[", i, "] must be on x's device ", x.device());
    width = w.size(0);
  }
}

struct Layer {
  bool has_in = false, has_out = false;
  Mask in, out;
  const Mask* inputs() const { return has_in ? &in : nullptr; }
  const Mask* outputs() const { return has_out ? &out : nullptr; }
};

std::vector<Layer> plan_chain(int64_t x_width, at::TensorList weights, const at::Tensor& patterns,
                              const std::string& family, const std::vector<std::string>& activations,
                              bool input_dropout, bool output_dropout, const std::string& scale,
                              const std::vector<double>& rates, std::vector<Act>* acts) {
  TORCH_CHECK_VALUE(family == "row" || family == "block", "unknown pattern family '", family,
                    "'; expected one of row, block");
  check_scale(scale);
  const int64_t layers = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(layers >= 1, "chain needs at least one weight");
  const int64_t sites = layers - 1 + input_dropout + output_dropout;
  TORCH_CHECK_VALUE(sites >= 1,
                    "chain needs at least one dropout site (input_dropout, output_dropout or two weights)");
  const auto rows = pattern_rows(patterns, sites);
  TORCH_CHECK_VALUE(static_cast<int64_t>(rates.size()) == sites, "chain has ", sites, " dropout sites but ",
                    rates.size(), " rates");
  const int64_t want = layers - 1 + output_dropout;
  TORCH_CHECK_VALUE(static_cast<int64_t>(activations.size()) == want, "chain needs ", want,
                    " activations (one per Linear followed by a dropout), got ", activations.size());
  acts->clear();
  for (const auto& name : activations) acts->push_back(parse_activation(name));
  std::vector<Layer> plan(layers);
  int64_t site = 0;
  bool has_prev = false;
  Mask prev;
  if (input_dropout) {
    prev = unit_mask(family, x_width, rows[0].first, rows[0].second, scale, rates[0]);
    has_prev = true;
    site = 1;
  }
  for (int64_t l = 0; l < layers; ++l) {
    plan[l].has_in = has_prev;
    plan[l].in = prev;
    if (l < layers - 1 || output_dropout) {
      plan[l].has_out = true;
      plan[l].out = unit_mask(family, weights[l].size(0), rows[site].first, rows[site].second, scale, rates[site]);
      ++site;
    }
    has_prev = plan[l].has_out;
    prev = plan[l].out;
  }
  return plan;
}

at::Tensor kept_rows(const at::Tensor& t, const Mask* m) {
  return (m == nullptr || m->full()) ? t : t.slice(0, m->start, m->stop, m->step);
}

// t[:, kept]: a view when contiguous, else a gather (BLAS needs a unit column stride).
at::Tensor kept_columns(const at::Tensor& t, const Mask* m) {
  if (m == nullptr || m->full()) return t;
  auto view = t.slice(1, m->start, m->stop, m->step);
  if (m->contiguous()) return view;
  auto compact = resident_empty(view.sizes(), view.options());  // a weight's columns: big, every step
  compact.copy_(view);
  return compact;
}

// A view of t (rows, cols) that strides only along rows/cols by a step: the columns must be a unit stride.
at::Tensor region(const at::Tensor& full, const Mask* rows, const Mask* cols) {
  at::Tensor r = full;
  if (rows != nullptr) r = r.slice(0, rows->start, rows->stop, rows->step);
  if (cols != nullptr) r = r.slice(1, cols->start, cols->stop, cols->step);
  return r;
}

// out = alpha * a @ b, written in place into a BLAS-compatible view (beta = 0 ignores out's contents).
void gemm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b, double alpha) {
  if (alpha == 1.0) {
    at::mm_out(out, a, b);
  } else {
    at::addmm_out(out, out, a, b, /*beta=*/0, /*alpha=*/alpha);
  }
}

at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, double alpha) {
  auto out = resident_empty({a.size(0), b.size(1)}, a.options());  // compact weight-gradient products
  gemm_into(out, a, b, alpha);
  return out;
}

// alpha * x @ w.t() for a Linear's (kept) weight w, contiguous (rows, w.size(0)). On the CPU, for few
// rows MKL runs the transposed product w @ x.t() (the weight as the left operand) faster than x @ w.t(),
// the copy back to rows included; for many rows, or a short inner dimension, slower.
// benchmarks/gemm_orientation.py (2 AMD EPYC cores, fp32, operands as the chain passes them), median
// time ratio transposed / plain over two runs: 0.72-0.97 at 32-64 rows; at 128-256 rows 0.84-0.99 for an
// inner dimension >= 512 and 0.94-1.10 below (1.08-1.10 at 256); at 700 rows 1.18-1.79. Hence the rule
// below (128 rows with a short inner dimension, 0.94-0.99, is left to the plain product). In MLP-4096
// training steps at p = 0.5 the forward phase fell ~11% (block and 4 row classes). Other devices: plain.
at::Tensor linear_product(const at::Tensor& x, const at::Tensor& w, double alpha) {
  const int64_t rows = x.size(0), inner = x.size(1);
  const bool transposed_faster = rows <= 64 || (rows <= 256 && inner >= 512);
  if (!x.is_cpu() || !transposed_faster) return gemm(x, w.t(), alpha);
  auto transposed = at::empty({w.size(0), rows}, x.options());
  gemm_into(transposed, w, x.t(), alpha);
  return transposed.t().contiguous();
}

// full (2-D, rows contiguous) = alpha * a @ b at [rows, cols] and zeros elsewhere: zero only the
// complement, GEMM straight into the kept region when that is a BLAS-compatible view; a strided
// column set (row family) goes through a compact product and one fused expand pass instead.
void scatter_product_into(const Kernels& k, at::Tensor& full, const Mask* rows, const Mask* cols, const at::Tensor& a,
                          const at::Tensor& b, double alpha) {
  if (rows != nullptr && rows->full()) rows = nullptr;
  if (cols != nullptr && cols->full()) cols = nullptr;
  if (cols == nullptr || cols->contiguous()) {
    k.zero_outside(full, rows, cols);
    gemm_into(region(full, rows, cols), a, b, alpha);
  } else {
    k.expand(full, gemm(a, b, 1.0), rows, cols, alpha);
  }
}

// A dense `shape` tensor holding alpha * a @ b at [rows, cols] and zeros elsewhere (`empty`, never
// `zeros` + a copy).
at::Tensor scatter_product(const Kernels& k, at::IntArrayRef shape, const at::TensorOptions& options,
                           const Mask* rows, const Mask* cols, const at::Tensor& a, const at::Tensor& b,
                           double alpha) {
  auto full = resident_empty(shape, options);
  scatter_product_into(k, full, rows, cols, a, b, alpha);
  return full;
}

// full[rows, cols] += alpha * a @ b (the row classes of one chain call add into the same gradient).
void accumulate_product(at::Tensor& full, const Mask* rows, const Mask* cols, const at::Tensor& a, const at::Tensor& b,
                        double alpha) {
  if (rows != nullptr && rows->full()) rows = nullptr;
  if (cols != nullptr && cols->full()) cols = nullptr;
  auto r = region(full, rows, cols);
  if (cols == nullptr || cols->contiguous()) {
    r.addmm_(a, b, /*beta=*/1, /*alpha=*/alpha);
  } else {
    r.add_(gemm(a, b, 1.0), alpha);
  }
}

// One row class of a call with patterns (M, sites, 2): rows start, start + step, ... (start < step)
// with their own patterns (sites, 2). A strided set of rows is a BLAS-compatible view (row stride
// step * width), so no class is ever gathered or scattered.
struct RowClass {
  int64_t start = 0, step = 1;
  at::Tensor patterns;
  at::Tensor of(const at::Tensor& t2) const { return t2.slice(0, start, t2.size(0), step); }
};

// fxdrop.ops.composite.row_groups: residue classes (mod 2, mod 4, ...) whose classes share one pattern
// set run as one strided set of rows; an odd factor of the class count splits into single classes.
void split_groups(const int64_t* data, int64_t per, int64_t classes, int64_t start, int64_t step,
                  std::vector<std::pair<int64_t, int64_t>>* out) {
  bool uniform = true;
  for (int64_t c = start + step; c < classes && uniform; c += step) {
    uniform = std::equal(data + c * per, data + (c + 1) * per, data + start * per);
  }
  if (uniform) {
    out->emplace_back(start, step);
  } else if ((classes / step) % 2 != 0) {
    for (int64_t c = start; c < classes; c += step) out->emplace_back(c, classes);
  } else {
    split_groups(data, per, classes, start, 2 * step, out);
    split_groups(data, per, classes, start + step, 2 * step, out);
  }
}

// fxdrop.ops.composite.row_classes, same messages. Patterns (sites, 2): one pattern set for all rows
// (returns no classes; plan_chain checks that shape). Patterns (M, sites, 2): row r uses
// patterns[r mod M]; returns the groups of split_groups.
std::vector<RowClass> row_classes(const at::Tensor& patterns, int64_t sites) {
  std::vector<RowClass> out;
  if (patterns.dim() != 3) return out;
  TORCH_CHECK_VALUE(patterns.scalar_type() == at::kLong && patterns.size(0) >= 1 && patterns.size(1) == sites &&
                        patterns.size(2) == 2,
                    "patterns must be an int64 tensor of shape (", sites, ", 2) = [dp, offset] per site, or (",
                    "classes, ", sites, ", 2) with row r using class r mod classes, got ",
                    dtype_name(patterns.scalar_type()), " ", patterns.sizes());
  const at::Tensor cpu = patterns.to(at::kCPU).contiguous();
  std::vector<std::pair<int64_t, int64_t>> groups;
  split_groups(cpu.data_ptr<int64_t>(), 2 * sites, cpu.size(0), 0, 1, &groups);
  for (auto [start, step] : groups) out.push_back({start, step, cpu[start]});
  return out;
}

int64_t num_sites(at::TensorList weights, bool input_dropout, bool output_dropout) {
  return static_cast<int64_t>(weights.size()) - 1 + input_dropout + output_dropout;
}

// The chain on 2-D rows x2 for one pattern set. Returns y2 (written into `out` when defined) and
// the tensors saved for backward.
std::pair<at::Tensor, std::vector<at::Tensor>> forward_rows(const Kernels& k, const at::Tensor& x2,
                                                            at::TensorList weights,
                                                            const std::vector<at::Tensor>& biases,
                                                            const std::vector<Layer>& plan,
                                                            const std::vector<Act>& acts, at::Tensor out) {
  at::Tensor cur = kept_columns(x2, plan[0].inputs());
  double alpha = plan[0].has_in ? plan[0].in.scale : 1.0;
  std::vector<at::Tensor> saved;
  size_t act_index = 0;
  const bool low_precision = x2.scalar_type() == at::kBFloat16 || x2.scalar_type() == at::kHalf;
  for (size_t l = 0; l < weights.size(); ++l) {
    const Layer& step = plan[l];
    const auto w = kept_columns(kept_rows(weights[l], step.outputs()), step.inputs());
    const auto b = biases[l].defined() ? kept_rows(biases[l], step.outputs()) : at::Tensor();
    if (!step.has_out && out.defined()) {  // the last Linear, straight into the caller's rows
      if (b.defined()) {
        at::addmm_out(out, b, cur, w.t(), 1, alpha);
      } else {
        gemm_into(out, cur, w.t(), alpha);
      }
      return {out, saved};
    }
    // In bf16/fp16, GEMM-then-bias rounds z twice, which flips the sign of near-zero z (and with it
    // the ReLU-family derivative) more often than the dense reference's single-rounding addmm: let
    // the GEMM add the bias there. fp32/fp64 keep the bias in the fused epilogue pass.
    const bool bias_in_gemm = b.defined() && low_precision;
    auto z = bias_in_gemm ? at::addmm(b, cur, w.t(), 1, alpha) : linear_product(cur, w, alpha);
    if (!step.has_out) {
      cur = (b.defined() && !bias_in_gemm) ? z.add_(b) : z;
      alpha = 1.0;
      continue;
    }
    const Act& act = acts[act_index++];
    auto [z_saved, h] = k.bias_act(z, bias_in_gemm ? at::Tensor() : b, act, act.needs_input());
    saved.push_back(act.needs_input() ? z_saved : x2.new_empty({0}));
    saved.push_back(h);
    cur = h;
    alpha = step.out.scale;
  }
  at::Tensor y = plan.back().has_out ? k.scatter_columns(cur, plan.back().out, alpha) : cur;
  if (out.defined()) {
    out.copy_(y);
    return {out, saved};
  }
  return {y, saved};
}

// Gradients of the chain on 2-D rows for one pattern set. Fresh (accumulate == false): grad_weights
// and grad_biases (one per Linear, undefined where there is no bias) are set, and *grad_x too when
// needed. Accumulating (row classes): they already hold dense tensors that this adds into, and the
// input gradient of these rows is written into grad_x_rows.
void backward_rows(const Kernels& k, at::Tensor g, const at::Tensor& x2, at::TensorList weights,
                   const std::vector<at::Tensor>& biases, const std::vector<Layer>& plan, const std::vector<Act>& acts,
                   at::TensorList saved, bool needs_input_grad, bool accumulate, bool first,
                   std::vector<at::Tensor>& grad_weights, std::vector<at::Tensor>& grad_biases, at::Tensor* grad_x,
                   at::Tensor grad_x_rows) {
  const int64_t layers = static_cast<int64_t>(weights.size());
  int64_t site = static_cast<int64_t>(saved.size()) / 2 - 1;  // latest hidden site
  at::Tensor g_bias;  // column sums of g, when the act-grad pass produced them
  if (plan.back().has_out) {
    const Mask& last = plan.back().out;
    // Strided view of grad_y for the row family: the fused pass reads it in place, no gather.
    const auto g_kept = last.full() ? g : g.slice(1, last.start, last.stop, last.step);
    std::tie(g, g_bias) = k.act_grad(g_kept, saved[2 * site], saved[2 * site + 1], acts[site], last.scale,
                                     biases.back().defined());
    --site;
  }
  for (int64_t l = layers - 1; l >= 0; --l) {
    const Layer& step = plan[l];
    const auto& weight = weights[l];
    const at::Tensor inp = l > 0 ? saved[2 * site + 1] : kept_columns(x2, step.inputs());
    const double alpha = step.has_in ? step.in.scale : 1.0;
    if (accumulate && first) {  // the first group writes its region and zeroes the rest: no separate zero pass
      scatter_product_into(k, grad_weights[l], step.outputs(), step.inputs(), g.t(), inp, alpha);
    } else if (accumulate) {
      accumulate_product(grad_weights[l], step.outputs(), step.inputs(), g.t(), inp, alpha);
    } else {
      grad_weights[l] = scatter_product(k, weight.sizes(), weight.options(), step.outputs(), step.inputs(), g.t(),
                                        inp, alpha);
    }
    if (biases[l].defined()) {
      at::Tensor sums = g_bias.defined() ? g_bias : g.sum(0);
      const bool all = !step.has_out || step.out.full();
      if (accumulate) {
        (all ? grad_biases[l] : grad_biases[l].slice(0, step.out.start, step.out.stop, step.out.step)).add_(sums);
      } else if (all) {
        grad_biases[l] = sums;
      } else {
        auto gb = at::zeros_like(biases[l]);
        gb.slice(0, step.out.start, step.out.stop, step.out.step).copy_(sums);
        grad_biases[l] = gb;
      }
    }
    g_bias = at::Tensor();
    if (l == 0 && !needs_input_grad) break;
    const auto w = kept_columns(kept_rows(weight, step.outputs()), step.inputs());
    if (l > 0) {
      const auto g_in = gemm(g, w, alpha);  // the dropout scale rides in the GEMM's alpha
      std::tie(g, g_bias) = k.act_grad(g_in, saved[2 * site], saved[2 * site + 1], acts[site], 1.0,
                                       biases[l - 1].defined());
      --site;
    } else if (accumulate) {
      if (!step.has_in || step.in.full()) {
        gemm_into(grad_x_rows, g, w, alpha);
      } else {
        scatter_product_into(k, grad_x_rows, nullptr, step.inputs(), g, w, alpha);
      }
    } else if (!step.has_in || step.in.full()) {
      *grad_x = gemm(g, w, alpha);
    } else {
      *grad_x = scatter_product(k, {g.size(0), x2.size(1)}, g.options(), nullptr, step.inputs(), g, w, alpha);
    }
  }
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> chain(
    const Kernels& k, const at::Tensor& x, at::TensorList weights, at::TensorList biases_in,
    c10::List<bool> has_bias, const at::Tensor& patterns, const std::string& family,
    const std::vector<std::string>& activations, bool input_dropout, bool output_dropout,
    const std::string& scale, const std::vector<double>& rates) {
  const auto biases = expand_biases(biases_in, has_bias, weights.size());
  check_chain(x, weights, biases);
  const auto x2 = x.reshape({-1, x.size(-1)});
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(weights.back().size(0));
  std::vector<Act> acts;
  const auto classes = row_classes(patterns, num_sites(weights, input_dropout, output_dropout));
  if (classes.empty()) {
    const auto plan = plan_chain(x.size(-1), weights, patterns, family, activations, input_dropout, output_dropout,
                                 scale, rates, &acts);
    auto [y, saved] = forward_rows(k, x2, weights, biases, plan, acts, at::Tensor());
    // Never a view (a caller's in-place op on a custom op's view output is an error): _unsafe_view.
    return {at::_unsafe_view(y.contiguous(), shape), saved};
  }
  auto y = at::empty({x2.size(0), weights.back().size(0)}, x.options());
  std::vector<at::Tensor> saved;
  for (const auto& cls : classes) {
    const auto plan = plan_chain(x.size(-1), weights, cls.patterns, family, activations, input_dropout,
                                 output_dropout, scale, rates, &acts);
    // A class without rows runs too (GEMMs of 0 rows): its saved tensors then have the fake kernel's shapes.
    auto piece = forward_rows(k, cls.of(x2), weights, biases, plan, acts, cls.of(y));
    saved.insert(saved.end(), piece.second.begin(), piece.second.end());
  }
  // Merged classes save nothing: pad to one set per class of `patterns` (a count fixed for compiled graphs).
  for (int64_t c = static_cast<int64_t>(classes.size()); c < patterns.size(0); ++c) {
    for (const auto& act : acts) {
      saved.push_back(act.needs_input() ? x2.new_empty({0, 0}) : x2.new_empty({0}));
      saved.push_back(x2.new_empty({0, 0}));
    }
  }
  return {at::_unsafe_view(y, shape), saved};
}

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> chain_backward(
    const Kernels& k, const at::Tensor& grad_y, const at::Tensor& x, at::TensorList weights, at::TensorList biases_in,
    c10::List<bool> has_bias, const at::Tensor& patterns, at::TensorList saved, const std::string& family,
    const std::vector<std::string>& activations, bool input_dropout, bool output_dropout,
    const std::string& scale, const std::vector<double>& rates, bool needs_input_grad) {
  const auto biases = expand_biases(biases_in, has_bias, weights.size());
  const int64_t layers = static_cast<int64_t>(weights.size());
  const auto x2 = x.reshape({-1, x.size(-1)});
  const at::Tensor g = grad_y.reshape({-1, grad_y.size(-1)});
  std::vector<Act> acts;
  std::vector<at::Tensor> grad_weights(layers), grad_biases(layers);
  at::Tensor grad_x;
  const auto classes = row_classes(patterns, num_sites(weights, input_dropout, output_dropout));
  if (classes.empty()) {
    const auto plan = plan_chain(x.size(-1), weights, patterns, family, activations, input_dropout, output_dropout,
                                 scale, rates, &acts);
    backward_rows(k, g, x2, weights, biases, plan, acts, saved, needs_input_grad, /*accumulate=*/false,
                  /*first=*/true, grad_weights, grad_biases, &grad_x, at::Tensor());
  } else {
    for (int64_t l = 0; l < layers; ++l) {
      // Written whole by the first class with rows (its region, zeros elsewhere); the others add.
      grad_weights[l] = resident_empty(weights[l].sizes(), weights[l].options());
      if (biases[l].defined()) grad_biases[l] = at::zeros_like(biases[l]);
    }
    bool first = true;
    if (needs_input_grad) grad_x = at::empty(x2.sizes(), x2.options());
    const int64_t per_class = 2 * static_cast<int64_t>(activations.size());
    TORCH_CHECK_VALUE(static_cast<int64_t>(saved.size()) == per_class * patterns.size(0),
                      "chain_backward: expected ", per_class * patterns.size(0), " saved tensors for ",
                      patterns.size(0), " row classes, got ", saved.size());
    for (size_t i = 0; i < classes.size(); ++i) {
      const auto& cls = classes[i];
      const auto g_rows = cls.of(g);
      if (g_rows.size(0) == 0) continue;
      const auto plan = plan_chain(x.size(-1), weights, cls.patterns, family, activations, input_dropout,
                                   output_dropout, scale, rates, &acts);
      backward_rows(k, g_rows, cls.of(x2), weights, biases, plan, acts, saved.slice(i * per_class, per_class),
                    needs_input_grad, /*accumulate=*/true, first, grad_weights, grad_biases, nullptr,
                    needs_input_grad ? cls.of(grad_x) : at::Tensor());
      first = false;
    }
    if (first) {  // no rows at all: the gradients are zero
      for (auto& gw : grad_weights) gw.zero_();
    }
  }
  std::vector<at::Tensor> present;
  for (const auto& gb : grad_biases) {
    if (gb.defined()) present.push_back(gb);
  }
  grad_x = grad_x.defined() ? grad_x.reshape(x.sizes()) : x.new_empty({0});
  return {grad_x, grad_weights, present};
}

at::Tensor unit_dropout(const Kernels& k, const at::Tensor& x, const at::Tensor& pattern, const std::string& family,
                        const std::string& scale, double p) {
  TORCH_CHECK_VALUE(family == "row" || family == "block", "unknown pattern family '", family,
                    "'; expected one of row, block");
  check_scale(scale);
  TORCH_CHECK_VALUE(x.dim() >= 1, "unit_dropout: x must have shape (..., units)");
  if (pattern.dim() == 1 || x.numel() == 0) {
    const auto [dp, offset] = single_pattern(pattern.dim() == 1 ? pattern : pattern[0]);
    return k.unit_dropout(x, unit_mask(family, x.size(-1), dp, offset, scale, p));
  }
  // (classes, 2): row r of x (flattened) uses pattern[r mod classes], by strided groups of rows.
  const auto classes = row_classes(pattern.unsqueeze(1), 1);
  const int64_t n = x.size(-1);
  const auto x2 = x.reshape({-1, n});
  auto out = at::empty(x.sizes(), x.options());
  auto out2 = out.view({-1, n});
  for (const auto& cls : classes) {
    const auto [dp, offset] = single_pattern(cls.patterns[0]);
    cls.of(out2).copy_(k.unit_dropout(cls.of(x2), unit_mask(family, n, dp, offset, scale, p)));
  }
  return out;
}

at::Tensor tile_linear(const Kernels& k, const at::Tensor& x, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& pattern, int64_t tile,
                       const std::string& scale, double p) {
  const at::Tensor b = bias.has_value() ? *bias : at::Tensor();
  check_chain(x, {weight}, {b});
  const auto [dp, offset] = single_pattern(pattern);
  const auto plan = tile_plan(weight.size(0), weight.size(1), tile, dp, offset, scale, p);
  const auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto y = k.tile_forward(x2, weight.contiguous(), b, plan);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(weight.size(0));
  return at::_unsafe_view(y.contiguous(), shape);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tile_linear_backward(
    const Kernels& k, const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& pattern, int64_t tile, const std::string& scale, double p, bool has_bias) {
  const auto [dp, offset] = single_pattern(pattern);
  const auto plan = tile_plan(weight.size(0), weight.size(1), tile, dp, offset, scale, p);
  const auto g2 = grad_y.reshape({-1, grad_y.size(-1)}).contiguous();
  const auto x2 = x.reshape({-1, x.size(-1)}).contiguous();
  auto [grad_x, grad_w] = k.tile_backward(g2, x2, weight.contiguous(), plan);
  auto grad_b = has_bias ? g2.sum(0) : g2.new_empty({0});
  return {grad_x.reshape(x.sizes()), grad_w, grad_b};
}

}  // namespace fxdrop
