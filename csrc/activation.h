// Elementwise activations fused into the structured ops' epilogues: forward and derivative.
//
// Mirrors fxdrop/ops/activations.py (names, default arguments, and which derivative needs the
// pre-activation z). Host/device inline so the CPU loops and the CUDA kernels share one definition.
#pragma once

#include <cmath>
#include <string>

#ifdef __CUDACC__
#define FXDROP_HD __host__ __device__ __forceinline__
#else
#define FXDROP_HD inline
#endif

namespace fxdrop {

enum class ActKind : int { None, Relu, Gelu, GeluTanh, Silu, Tanh, Sigmoid, LeakyRelu, Elu };

struct Act {
  ActKind kind = ActKind::None;
  double arg = 0.0;  // LeakyReLU slope or ELU alpha

  // Whether the derivative needs z (else h = act(z) suffices); activations.needs_input().
  bool needs_input() const {
    return !(kind == ActKind::None || kind == ActKind::Relu || kind == ActKind::Tanh || kind == ActKind::Sigmoid);
  }
  // Cheap enough that a scalar CPU loop beats a separate vectorised ATen pass.
  bool simple() const { return kind == ActKind::None || kind == ActKind::Relu || kind == ActKind::LeakyRelu; }
};

Act parse_activation(const std::string& name);  // raises ValueError like activations.parse()

template <typename T>
FXDROP_HD T act_forward(ActKind kind, T arg, T z) {
  switch (kind) {
    case ActKind::None: return z;
    case ActKind::Relu: return z > T(0) ? z : T(0);
    case ActKind::Gelu: return T(0.5) * z * (T(1) + erf(z * T(M_SQRT1_2)));
    case ActKind::GeluTanh: {
      const T inner = T(M_2_SQRTPI * M_SQRT1_2) * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + tanh(inner));
    }
    case ActKind::Silu: return z / (T(1) + exp(-z));
    case ActKind::Tanh: return tanh(z);
    case ActKind::Sigmoid: return T(1) / (T(1) + exp(-z));
    case ActKind::LeakyRelu: return z > T(0) ? z : z * arg;
    case ActKind::Elu: return z > T(0) ? z : arg * (exp(z) - T(1));
  }
  return z;
}

// dL/dz from dL/dh = g, given z (valid when needs_input()) and h = act(z).
template <typename T>
FXDROP_HD T act_backward(ActKind kind, T arg, T g, T z, T h) {
  switch (kind) {
    case ActKind::None: return g;
    case ActKind::Relu: return h > T(0) ? g : T(0);
    case ActKind::Gelu: {
      const T cdf = T(0.5) * (T(1) + erf(z * T(M_SQRT1_2)));
      const T pdf = exp(T(-0.5) * z * z) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
      return g * (cdf + z * pdf);
    }
    case ActKind::GeluTanh: {
      const T k_beta = T(M_2_SQRTPI * M_SQRT1_2);
      const T k_kappa = T(0.044715);
      const T z2 = z * z;
      const T inner = k_beta * (z + k_kappa * z2 * z);
      const T t = tanh(inner);
      const T left = T(0.5) * z;
      const T right = T(1) + t;
      const T left_d = T(0.5) * right;
      const T inner_d = k_beta * (T(1) + T(3) * k_kappa * z2);
      const T right_d = left * (T(1) - t * t) * inner_d;
      return g * (left_d + right_d);
    }
    case ActKind::Silu: {
      const T s = T(1) / (T(1) + exp(-z));
      return g * s * (T(1) + z * (T(1) - s));
    }
    case ActKind::Tanh: return g * (T(1) - h * h);
    case ActKind::Sigmoid: return g * (T(1) - h) * h;
    case ActKind::LeakyRelu: return z > T(0) ? g : g * arg;
    case ActKind::Elu: return z > T(0) ? g : g * arg * exp(z);
  }
  return g;
}

}  // namespace fxdrop
