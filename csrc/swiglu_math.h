// SwiGLU elementwise math, shared by the CPU (ops.cpp) and CUDA (swiglu.cu) kernels so
// both compute the same expressions. acc_t is at::opmath_type of the input: float for
// bf16/fp16/fp32, double for fp64; the caller rounds the results once.
//
//   p  = silu(a) * u,                    silu(a) = a * s,  s = sigmoid(a)
//   da = dp * u * silu'(a),              silu'(a) = s * (1 + a * (1 - s))
//   du = dp * silu(a)
//
// The functions take s as an input: CUDA evaluates sigmoid() below inline; the CPU kernels get
// s from ATen's vectorised sigmoid (this extension is compiled without SIMD flags, where a
// per-element exp would make the CPU pass several times slower than eager PyTorch).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace mecefo {

template <typename acc_t>
C10_HOST_DEVICE inline acc_t sigmoid(acc_t a) {
  // exp(-a) overflows to inf for very negative a, giving sigmoid = 0 and silu = -0: no NaN.
  return acc_t(1) / (acc_t(1) + std::exp(-a));
}

template <typename acc_t>
C10_HOST_DEVICE inline acc_t swiglu(acc_t a, acc_t s, acc_t u) {
  return a * s * u;
}

template <typename acc_t>
struct SwigluGrads {
  acc_t da, du, p;
};

template <typename acc_t>
C10_HOST_DEVICE inline SwigluGrads<acc_t> swiglu_grads(acc_t dp, acc_t a, acc_t s, acc_t u) {
  const acc_t silu = a * s;
  return {dp * u * (s * (acc_t(1) + a * (acc_t(1) - s))), dp * silu, silu * u};
}

}  // namespace mecefo
